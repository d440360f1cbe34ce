"""Chat templates: which one a run uses (`--chat-template NAME|FILE.jinja|tokenizer`) and rendering a conversation
with it, its work bounded (see `sandbox`).

`resolve_chat_template(spec, tokenizer)` says where the template comes from: a built-in name (the `*.jinja` files
beside this module, written from each model family's official template), a Jinja file, or `tokenizer` (the default)
for the model's own. `use_chat_template` then checks it (it compiles, renders a one-message chat, and the tokenizer
has every special token it writes) and gives it to the tokenizer, which saves it with the adapter.

Every conversation is rendered by `ChatTemplate.render`, never by transformers' `apply_chat_template`, whose
environment bounds nothing: the same options, globals and variables (messages, add_generation_prompt, the tokenizer's
special tokens), so the text and then the token ids are the same as transformers gives, within limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from dpo_cli.data.templates.sandbox import (
    MAX_TEMPLATE_CHARS,
    RenderLimits,
    TemplateBoundExceeded,
    compile_template,
    render,
)
from dpo_cli.errors import UserError
from dpo_cli.files import read_user_text

TOKENIZER = "tokenizer"
"""The spec for the model's own template (the default, as is an empty spec)."""

BUILTIN_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "qwen2.5": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "gemma3": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": (),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "phi4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    "deepseek3": ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    "zephyr": (),
    "alpaca": (),
}
"""Each built-in template, and the special tokens its models have that it writes as single tokens. Mistral's
`[INST]` and zephyr's `<|user|>` are plain text to their own tokenizers, so they need none."""

BUILTIN_NAMES = tuple(BUILTIN_TOKENS)
ONLY_SPECIAL = frozenset().union(*BUILTIN_TOKENS.values()) - {
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<think>",
    "</think>",
}
"""Markers that only ever mean one special token, so a template file that writes one needs it: `<|im_start|>`,
`<start_of_turn>`, ... Zephyr-style `<|user|>` and `<think>` are plain text to many tokenizers, by design."""


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    origin: str
    """Where it came from, to start a message: "built-in chat template 'chatml'", the file's path, or "MODEL (the
    model's own chat template)"."""

    def render(
        self, tokenizer, messages: list[dict], add_generation_prompt: bool, limits: RenderLimits = RenderLimits()
    ) -> str:
        """The conversation's text, as transformers' apply_chat_template renders it (tools and documents None, the
        tokenizer's special tokens as variables); a limit exceeded is one line naming the template."""
        variables = {**tokenizer.special_tokens_map}
        try:
            return render(
                self.text,
                limits,
                **variables,
                messages=[dict(message) for message in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateBoundExceeded as error:
            raise self.bound_error(error) from None

    def bound_error(self, error: TemplateBoundExceeded) -> UserError:
        return UserError(
            f"{self.origin}: the chat template {error}; it is refused (templates are untrusted code): use a "
            f"built-in one, --chat-template NAME ({', '.join(BUILTIN_NAMES)}), or fix the template"
        )

    def compile(self) -> None:
        """Compile it now: a template that does not parse is one line naming it."""
        try:
            compile_template(self.text)
        except TemplateBoundExceeded as error:
            raise self.bound_error(error) from None
        except (jinja2.TemplateError, RecursionError) as error:
            raise UserError(
                f"{self.origin}: the chat template does not compile ({error.__class__.__name__}: {error})"
            ) from None


def template_of_tokenizer(tokenizer) -> ChatTemplate:
    """The tokenizer's own template (text "" when it has none); a dict of named templates gives its 'default'."""
    text = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(text, dict):
        text = text.get("default", "")
    where = getattr(tokenizer, "name_or_path", "") or "the model"
    return ChatTemplate(text, f"{where} (the model's own chat template)")


def builtin_template_text(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def is_template_file(spec: str) -> bool:
    """Whether `spec` names a file (as opposed to a built-in name or `tokenizer`)."""
    return bool(spec) and spec != TOKENIZER and spec not in BUILTIN_TOKENS


def template_file(spec: str) -> str:
    """The file `spec` names, or "" for a built-in name or the model's own template."""
    return spec if is_template_file(spec) else ""


def resolve_chat_template(spec: str, tokenizer) -> ChatTemplate:
    """The template `--chat-template`/`data.chat_template` names: a built-in name, a Jinja file, or `tokenizer` (or
    empty) for the model's own, whose text may be "" (no template)."""
    if not spec or spec == TOKENIZER:
        return template_of_tokenizer(tokenizer)
    if spec in BUILTIN_TOKENS:
        return ChatTemplate(builtin_template_text(spec), f"built-in chat template '{spec}'")
    path = Path(spec)
    if not path.exists() and path.suffix != ".jinja" and "/" not in spec:
        raise UserError(
            f"--chat-template {spec}: no such built-in template or file; pass one of {', '.join(BUILTIN_NAMES)}, "
            f"{TOKENIZER} (the model's own) or a FILE.jinja (recipe key data.chat_template)"
        )
    hint = "pass a Jinja template file, a built-in name or tokenizer with --chat-template"
    if path.is_file() and path.stat().st_size > 4 * MAX_TEMPLATE_CHARS:
        raise UserError(f"{spec}: the chat template file is {path.stat().st_size:,} bytes, far more than any template")
    return ChatTemplate(read_user_text(spec, "chat template file", hint), spec)


def needed_tokens(spec: str, template: ChatTemplate) -> list[str]:
    """The special tokens `template` writes as single tokens: a built-in's own list, the `ONLY_SPECIAL` markers in a
    file's text. None for the model's own template, which goes with its own tokenizer."""
    if spec in BUILTIN_TOKENS:
        return list(BUILTIN_TOKENS[spec])
    if is_template_file(spec):
        return sorted(token for token in ONLY_SPECIAL if token in template.text)
    return []


def missing_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """The tokens of `tokens` that this tokenizer would split into pieces (no single token of its own)."""
    vocab = tokenizer.get_vocab()
    return [t for t in tokens if t not in vocab or vocab[t] not in tokenizer.encode(t, add_special_tokens=False)]


def use_chat_template(tokenizer, spec: str) -> ChatTemplate:
    """The template `spec` names, checked; given to the tokenizer (saved with the adapter, in its fingerprint)."""
    template = resolve_chat_template(spec, tokenizer)
    if not template.text:
        return template
    template.compile()
    if missing := missing_tokens(tokenizer, needed_tokens(spec, template)):
        raise UserError(
            f"{template.origin}: writes {', '.join(missing)}, which the tokenizer of "
            f"{getattr(tokenizer, 'name_or_path', 'the model')} does not have as single tokens (they would be split "
            "into pieces and mean nothing to the model); pick the template of this model's family, or its own "
            f"(--chat-template {TOKENIZER})"
        )
    if is_template_file(spec) or spec in BUILTIN_TOKENS:
        try:
            template.render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except UserError:
            raise
        except Exception as error:  # jinja2 syntax and render errors have many types; all mean the template is broken
            raise UserError(
                f"{template.origin}: the chat template does not render ({error.__class__.__name__}: {error})"
            ) from None
        tokenizer.chat_template = template.text
    return template
