"""Rendering a chat template with its work bounded: a template from a downloaded model folder is untrusted code.

jinja2's sandbox stops a template from reaching Python's internals, but not from taking all memory or CPU:
`{{ 'x' * 2000000000 }}`, a string doubled with `~` in a loop, or loops nested inside loops all run unchecked. Here
every rendering runs under `RenderLimits`:

- no value the template builds (a string, a list, a number's digits) may exceed `max_chars`: `*`, `**`, `+`, `%`,
  `~`, every filter and every call are checked, and those that could build a huge value from small ones (`*`,
  `**`, `%`/`format` widths, `center`, `indent`, `join`, `replace`, ...) are checked *before* they run;
- the text it writes, counted as it is written (inside macros and `set` blocks too), may not exceed `4 * max_chars`,
  and the rendered text `max_chars`;
- loop iterations, calls, filters and operators together may not exceed `max_steps`, and the rendering may not take
  longer than `seconds`.

Going over any limit raises `TemplateBoundExceeded`, which the caller turns into one line naming the template. The
environment is otherwise transformers' own for `apply_chat_template` (the same options, globals and `tojson`), so a
template renders the same text here as there.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_TEMPLATE_CHARS = 1 << 20
"""The longest template text accepted (real ones are a few KB)."""


class TemplateBoundExceeded(Exception):
    """A rendering went over one of its limits; the message says which, to follow 'the chat template ...'."""


@dataclass(frozen=True)
class RenderLimits:
    max_chars: int = 1 << 20
    """The largest value (characters of a string, elements and contents of a list) and the longest rendered text."""
    max_steps: int = 2_000_000
    """Loop iterations, calls, filters and operators of one rendering."""
    seconds: float = 5.0
    """Real templates render a conversation in milliseconds."""

    @classmethod
    def for_window(cls, max_length: int, chars_per_token: int) -> RenderLimits:
        """Limits no real template comes near for a conversation cut to `max_length` tokens: its text is at most
        three windows of characters (prompt, and a completion cut at twice that), each message costs a template a
        few dozen steps, and there are at most three windows of messages."""
        return cls(max_chars=4 * max_length * chars_per_token + 65536, max_steps=1_000_000 + 100 * max_length)


# One rendering's budget ---------------------------------------------------------------------------------------------


class _Budget:
    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.steps = 0
        self.written = 0
        self.deadline = time.monotonic() + limits.seconds

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise TemplateBoundExceeded(
                f"took more than {self.limits.max_steps:,} steps (loop iterations, calls, filters) for one rendering"
            )
        if time.monotonic() > self.deadline:
            raise TemplateBoundExceeded(f"took more than {self.limits.seconds:g} s for one rendering")

    def allow(self, size: int, what: str) -> None:
        """Refuse a value of `size` before or after it is built."""
        if size > self.limits.max_chars:
            raise TemplateBoundExceeded(
                f"builds {what} of {size:,} characters or elements, over the {self.limits.max_chars:,} one rendering "
                "may build"
            )

    def check(self, value, what: str = "a value"):
        self.allow(size_of(value, self.limits.max_chars), what)
        return value

    def write(self, text: str) -> None:
        self.written += len(text)
        if self.written > 4 * self.limits.max_chars:
            raise TemplateBoundExceeded(f"writes more than {4 * self.limits.max_chars:,} characters in one rendering")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # compiling folds constants: this runs nothing a budget could not bound, but guard anyway
        raise TemplateBoundExceeded("ran an operation outside a bounded rendering")
    return budget


def size_of(value, limit: int) -> int:
    """Characters of a string, decimal digits of an int, elements plus contents of lists, tuples, sets and dicts;
    counting stops once past `limit`, so it costs at most that. A namespace counts 1: what it holds was counted when
    it was built."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, bool) or item is None:
            total += 1
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 1
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += len(item)
            stack.extend(item)
        else:
            total += 1
    return total


# Checks before an operation that could build a large value from small ones -----------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?([^a-zA-Z%]*)")
_NUMBER = re.compile(r"\d+")


def _check_widths(spec: str, budget: _Budget, what: str) -> None:
    if "*" in spec or "{" in spec:
        raise TemplateBoundExceeded(f"uses a computed width in {what}, which the sandbox does not allow")
    for number in _NUMBER.findall(spec):
        if len(number) > 9:
            budget.allow(10**9, f"a {what} width")
        budget.allow(int(number), f"a {what} width")


def _check_percent_format(text: str, budget: _Budget) -> None:
    for spec in _PERCENT_SPEC.findall(text):
        _check_widths(spec, budget, "%-format")


def _check_str_format(text: str, budget: _Budget) -> None:
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        return  # format() itself raises the same error
    for _, _, spec, _ in fields:
        if spec:
            _check_widths(spec, budget, "format()")


def _repeat_size(sequence, times, budget: _Budget) -> int:
    return size_of(sequence, budget.limits.max_chars) * max(times, 0)


def _replace_size(text: str, old: str, new: str, count: int = -1) -> int:
    occurrences = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * max(len(new) - len(old), 0)


def _joined_size(items, separator, budget: _Budget) -> int:
    items = list(items) if not isinstance(items, list | tuple) else items
    return size_of(items, budget.limits.max_chars) + len(str(separator)) * len(items)


def _materialized(args: tuple) -> tuple:
    """`args` with a lazy first argument (`|map`, `|select`) made a list, so that checking it does not use it up."""
    if args and isinstance(args[0], Iterator):
        return (list(args[0]), *args[1:])
    return args


def _pre_binop(operator: str, left, right, budget: _Budget) -> None:
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(times, int) and isinstance(sequence, str | bytes | list | tuple):
                budget.allow(_repeat_size(sequence, times, budget), "a repeated value")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            budget.allow(left.bit_length() * right * 3 // 10, "a power")
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left, budget)


_STR_METHODS_THAT_SHRINK_OR_KEEP = frozenset(
    "capitalize casefold count decode encode endswith find hex index isalnum isalpha isascii isdecimal isdigit "
    "isidentifier islower isnumeric isprintable isspace istitle isupper lower lstrip partition removeprefix "
    "removesuffix rfind rindex rpartition rsplit rstrip split splitlines startswith strip swapcase title upper".split()
)
"""str and bytes methods whose result is no larger than a small multiple of their inputs (the result is checked)."""


def _pre_call(function, args, kwargs, budget: _Budget) -> None:
    owner = getattr(function, "__self__", None)
    name = getattr(function, "__name__", "")
    if isinstance(owner, str | bytes):
        if name in ("center", "ljust", "rjust", "zfill"):
            width = args[0] if args else kwargs.get("width", 0)
            budget.allow(width if isinstance(width, int) else 0, f"a padded string ({name})")
        elif name == "replace":
            budget.allow(_replace_size(owner, *args[:3]) if len(args) >= 2 else 0, "a replaced string")
        elif name == "join":
            budget.allow(_joined_size(args[0], owner, budget) if args else 0, "a joined string")
        elif name == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            budget.allow(len(owner) * max(tabsize if isinstance(tabsize, int) else 8, 1), "an expanded string")
        elif name not in _STR_METHODS_THAT_SHRINK_OR_KEEP:
            raise TemplateBoundExceeded(f"calls {type(owner).__name__}.{name}(), which the sandbox does not allow")
    elif isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        budget.allow(length if isinstance(length, int) else 0, "a bytes value")


def _width(value, default: int) -> int:
    return len(value) if isinstance(value, str) else value if isinstance(value, int) else default


def _pre_filter(name: str, args, kwargs, budget: _Budget) -> None:
    """Filters that could build a large value from small inputs (args[0] is the filtered value)."""
    value = args[0] if args else ""
    rest = args[1:]
    if name == "center":
        budget.allow(_width(rest[0] if rest else kwargs.get("width", 80), 80), "a centered string")
    elif name == "indent":
        width = _width(rest[0] if rest else kwargs.get("width", 4), 4)
        text = str(value)
        budget.allow(len(text) + (text.count("\n") + 1) * width, "an indented string")
    elif name == "join":
        separator = rest[0] if rest else kwargs.get("d", "")
        budget.allow(_joined_size(value, separator, budget), "a joined string")
    elif name == "format":
        _check_percent_format(str(value), budget)
    elif name == "replace" and len(rest) >= 2:
        count = rest[2] if len(rest) > 2 else kwargs.get("count")
        budget.allow(_replace_size(str(value), str(rest[0]), str(rest[1]), count), "a replaced string")
    elif name == "wordwrap":
        wrapstring = rest[2] if len(rest) > 2 else kwargs.get("wrapstring") or "\n"
        budget.allow(len(str(value)) * (1 + len(str(wrapstring))), "a wrapped string")
    elif name in ("batch", "slice"):
        count = rest[0] if rest else 1
        budget.allow(count if isinstance(count, int) else 0, f"a {name} of lists")
    elif name == "tojson":  # JSON is a few times its value at most, plus the indentation of each nested element
        indent = rest[1] if len(rest) > 1 else kwargs.get("indent")
        if _width(indent or 0, 0) > 64:
            raise TemplateBoundExceeded("indents JSON by more than 64, which the sandbox does not allow")
    elif name == "sum":
        start = rest[1] if len(rest) > 1 else kwargs.get("start", 0)
        if not isinstance(start, int | float):
            raise TemplateBoundExceeded("sums non-numbers (|sum with a start), which the sandbox does not allow")


# The environment ------------------------------------------------------------------------------------------------


class _Guards(jinja2.ext.Extension):
    """What the rewritten template calls: each loop's items, each piece of output and each `~` go through here.
    Also accepts transformers' `{% generation %}...{% endgeneration %}` block (it renders its body)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()

    def iterate(self, iterable):
        budget = _budget()
        for item in iterable:
            budget.tick()
            yield item

    def emit(self, value) -> str:
        text = str(value)
        _budget().write(text)
        return text

    def concat(self, *values) -> str:
        budget = _budget()
        budget.tick()
        budget.allow(sum(size_of(value, budget.limits.max_chars) for value in values), "a string joined with ~")
        return budget.check("".join(map(str, values)), "a string joined with ~")


class _BoundTheTemplate(NodeTransformer):
    """Every loop's items, output and `~` through `_Guards`, so none escapes the budget."""

    def __init__(self, guards: str):
        self.guards = guards

    def _call(self, name: str, args: list, lineno: int) -> nodes.Call:
        return nodes.Call(nodes.ExtensionAttribute(self.guards, name, lineno=lineno), args, [], None, None).set_lineno(
            lineno
        )

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._call("iterate", [node.iter], node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        pieces = [nodes.Const(n.data) if isinstance(n, nodes.TemplateData) else n for n in node.nodes]
        node.nodes = [self._call("emit", [piece], node.lineno) for piece in pieces]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._call("concat", node.nodes, node.lineno)


def _bounded_filter(name: str, function):
    """`function` ticked and checked; marked pass_context so that compiling never runs it on constants."""
    passes = jinja2.utils._PassArg.from_obj(function)

    @jinja2.pass_context
    def bounded(context, *args, **kwargs):
        budget = _budget()
        budget.tick()
        if name == "join":
            args = _materialized(args)
        _pre_filter(name, args, kwargs, budget)
        if passes is jinja2.utils._PassArg.context:
            result = function(context, *args, **kwargs)
        elif passes is jinja2.utils._PassArg.eval_context:
            result = function(context.eval_ctx, *args, **kwargs)
        elif passes is jinja2.utils._PassArg.environment:
            result = function(context.environment, *args, **kwargs)
        else:
            result = function(*args, **kwargs)
        return budget.check(result, f"a value (|{name})")

    return bounded


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own: json.dumps without jinja's HTML escaping
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """transformers' `dict` global: a constructor without dict's own attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed names."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed names ({name!r})")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with every operation that could grow a value or loop checked."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Guards, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, function) for name, function in self.filters.items()}
        self.globals.pop("lipsum", None)  # lipsum(n=10**9) writes without a bound, and no chat template needs it
        self.globals.update(
            raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_Namespace
        )
        self._guards = _Guards.identifier
        self._guard_methods = self.extensions[_Guards.identifier]

    def _parse(self, source, name, filename):
        return _BoundTheTemplate(self._guards).visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        budget.tick()
        _pre_binop(operator, left, right, budget)
        return budget.check(super().call_binop(context, operator, left, right), f"a value ({operator})")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        if getattr(__obj, "__self__", None) is __self._guard_methods:  # our own guards: they count for themselves
            kwargs.pop("_loop_vars", None)  # what jinja passes for context.call, which this skips
            kwargs.pop("_block_vars", None)
            return __obj(*args, **kwargs)
        budget = _budget()
        budget.tick()
        if isinstance(getattr(__obj, "__self__", None), str | bytes) and getattr(__obj, "__name__", "") == "join":
            args = _materialized(args)
        _pre_call(__obj, args, kwargs, budget)
        return budget.check(super().call(__context, __obj, *args, **kwargs), "a value (a call)")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        @functools.wraps(wrapped)
        def bounded_format(*args, **kwargs):
            _check_str_format(text, _budget())
            return wrapped(*args, **kwargs)

        return bounded_format


_ENVIRONMENT = BoundedEnvironment()


@functools.lru_cache(maxsize=16)
def compile_template(text: str) -> jinja2.Template:
    """The template `text` compiled in the bounded environment (jinja2 errors as they are raised)."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateBoundExceeded(f"is {len(text):,} characters long, over the {MAX_TEMPLATE_CHARS:,} accepted")
    return _ENVIRONMENT.from_string(text)


def render(text: str, limits: RenderLimits, **variables) -> str:
    """The template `text` rendered with `variables` inside `limits`; jinja2's own errors pass through, a limit
    exceeded (or a template nested too deep for Python) is TemplateBoundExceeded."""
    template = compile_template(text)
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        rendered = template.render(**variables)
    except RecursionError:
        raise TemplateBoundExceeded("nests calls or loops too deeply") from None
    finally:
        _BUDGET.reset(token)
    if len(rendered) > limits.max_chars:
        raise TemplateBoundExceeded(f"renders {len(rendered):,} characters, over the {limits.max_chars:,} allowed")
    return rendered
