"""Command-line options built from the recipe's own declarations: each flag is written once, beside its field.

A recipe field that has a flag says so in its metadata, `field(default=0.1, metadata={"flag": "--beta"})`, and its
help is the docstring written under it in config.py. A bool field's flag is either one switch that sets the opposite of
its default (`--no-quantize`) or a pair that sets either value (`--gradient-checkpointing/--no-gradient-checkpointing`).
`flag_in` names a command where the same setting goes by another flag (eval's `--batch-size` is
`training.eval_batch_size`). A command lists the recipe keys it accepts:

    @app.command()
    @recipe_flags("eval", "model.path", "dpo.beta", ...)
    def eval_(adapter: Path = ..., *, overrides: dict):

and receives `overrides`, {section: {key: value}} of the flags given and every `--set section.key=value`, ready for
`load_recipe` or the adapter's saved recipe. Flags left out are absent, so the recipe's value stands.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from rich.markup import escape

from dpo_cli.config import Recipe, parse_set_option

SET_HELP = "Any recipe key: --set section.key=value (repeatable); applied after the flags."
SET_PARAMETER = "recipe_set"


@dataclass(frozen=True)
class RecipeFlag:
    """One recipe setting as a command's option."""

    key: str
    """section.key, e.g. training.lr."""
    flag: str
    """Its name on this command, e.g. --lr."""
    annotation: Any
    """The field's type: str, int, float, bool or list[str]."""
    default: Any
    help: str

    @property
    def parameter(self) -> str:
        """The Python name typer hands the value under: training__lr."""
        return self.key.replace(".", "__")

    @property
    def is_pair(self) -> bool:
        """A bool flag declared as a pair, `--gradient-checkpointing/--no-gradient-checkpointing`, sets either value."""
        return self.annotation is bool and "/" in self.flag

    @property
    def negates(self) -> bool:
        """A lone bool flag such as --no-quantize sets the opposite of the field's default."""
        return self.annotation is bool and not self.is_pair


def section_fields() -> dict[str, tuple[type, tuple[dataclasses.Field, ...]]]:
    """{section: (its dataclass, its fields)}, in the recipe's order."""
    hints = typing.get_type_hints(Recipe)
    return {part.name: (hints[part.name], dataclasses.fields(hints[part.name])) for part in dataclasses.fields(Recipe)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring, on one line}: the string literal written under each field of a dataclass."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def declared_flag(item: dataclasses.Field, command: str) -> str | None:
    """The flag a field declares for `command`: its `flag_in` entry, else its `flag`, else none."""
    return item.metadata.get("flag_in", {}).get(command) or item.metadata.get("flag")


def flags_for(command: str, keys: typing.Iterable[str]) -> list[RecipeFlag]:
    """The RecipeFlag of each key, as `command` names it; a key without a flag there is a bug in the caller."""
    fields = {f"{name}.{item.name}": (cls, item) for name, (cls, items) in section_fields().items() for item in items}
    found = []
    for key in keys:
        cls, item = fields[key]
        flag = declared_flag(item, command)
        if flag is None:
            raise LookupError(f"recipe key {key} declares no flag for `{command}`")
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        annotation = typing.get_type_hints(cls)[item.name]
        help_text = field_docs(cls).get(item.name)
        if not help_text:
            raise LookupError(f"recipe key {key} has a flag but no docstring to be its help")
        found.append(RecipeFlag(key, flag, annotation, default, help_text))
    return found


def every_flagged_key(command: str, except_sections: tuple[str, ...] = ()) -> list[str]:
    """The keys that declare a flag for `command`, but those of `except_sections` (train takes all but sft's, sft all
    but dpo's)."""
    return [
        f"{name}.{item.name}"
        for name, (_, items) in section_fields().items()
        if name not in except_sections
        for item in items
        if declared_flag(item, command) is not None
    ]


def _option(flag: RecipeFlag, required: bool) -> inspect.Parameter:
    """The typer parameter of a recipe flag: unset means None (keep the recipe's value), grouped by section."""
    section = flag.key.split(".")[0]
    if flag.negates:
        default, annotation = False, bool
    elif flag.is_pair:
        default, annotation = None, bool | None  # neither flag given: None, the recipe's value stands
    else:
        default, annotation = (... if required else None), flag.annotation | None
    option = typer.Option(
        default, flag.flag, help=escape(f"{flag.help} ({flag.key})"), rich_help_panel=f"Recipe: {section}"
    )
    return inspect.Parameter(flag.parameter, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _set_option() -> inspect.Parameter:
    option = typer.Option(None, "--set", help=SET_HELP, rich_help_panel="Recipe")
    return inspect.Parameter(SET_PARAMETER, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=list[str] | None)


def overrides_from_flags(values: dict[str, Any], set_options: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} from {section.key: flag value} (None and [] are flags not given), then --set's."""
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if value is None or value == []:
            continue
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    for option in set_options or []:
        section, name, value = parse_set_option(option)
        overrides.setdefault(section, {})[name] = value
    return overrides


def recipe_flags(command: str, *keys: str, required: tuple[str, ...] = ()) -> Callable:
    """Give a typer command an option per recipe key (flag and help from the field) and --set; it gets `overrides`."""
    flags = flags_for(command, keys)

    def decorate(function: Callable) -> Callable:
        hints = typing.get_type_hints(function)
        own = [
            parameter.replace(annotation=hints.get(parameter.name, parameter.annotation))
            for parameter in inspect.signature(function).parameters.values()
            if parameter.name != "overrides"
        ]

        @functools.wraps(function)
        def command_with_recipe(**arguments):
            given = {flag.key: _flag_value(flag, arguments.pop(flag.parameter)) for flag in flags}
            overrides = overrides_from_flags(given, arguments.pop(SET_PARAMETER))
            return function(**arguments, overrides=overrides)

        added = [_option(flag, flag.key in required) for flag in flags] + [_set_option()]
        command_with_recipe.__signature__ = inspect.Signature(own + added)
        command_with_recipe.recipe_flags = flags  # what tests/test_flags.py checks against the fields
        return command_with_recipe

    return decorate


def _flag_value(flag: RecipeFlag, value: Any) -> Any:
    if flag.negates:
        return (not flag.default) if value else None
    return value


def options_flags(cls: type, command: str, into: str, panel: str | None = None) -> Callable:
    """Give a typer command an option per field of the dataclass `cls`, flag and help from the field's metadata
    (`flag`, `flag_in[command]`, `help`), so that commands sharing a group of options declare them once there; the
    command receives `into=cls(...)` of the values given or defaulted; `panel` groups them in --help."""
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)

    def option_of(item: dataclasses.Field) -> inspect.Parameter:
        flag = item.metadata.get("flag_in", {}).get(command) or item.metadata["flag"]
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        option = typer.Option(default, flag, help=escape(item.metadata["help"]), rich_help_panel=panel)
        return inspect.Parameter(
            f"{into}__{item.name}", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[item.name]
        )

    def decorate(function: Callable) -> Callable:
        own_hints = typing.get_type_hints(function)
        own = [
            parameter.replace(annotation=own_hints.get(parameter.name, parameter.annotation))
            for parameter in inspect.signature(function).parameters.values()
            if parameter.name != into
        ]

        @functools.wraps(function)
        def command_with_options(**arguments):
            values = {item.name: arguments.pop(f"{into}__{item.name}") for item in fields}
            return function(**arguments, **{into: cls(**values)})

        command_with_options.__signature__ = inspect.Signature(own + [option_of(item) for item in fields])
        return command_with_options

    return decorate
