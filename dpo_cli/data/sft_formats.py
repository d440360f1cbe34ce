"""The shapes supervised fine-tuning data comes in, and how each becomes a (prompt, completion) example.

`dpo-cli sft` reads TRL's SFT formats and every preference format, through the same readers as `train`
(records.py), so a problem is reported as `file:line: field 'x': what is wrong; what to do`:

  prompt-completion  {"prompt", "completion"}: strings, or message lists (conversational), as TRL's SFTTrainer
  messages           {"messages": [{"role", "content"}, ...]}: the completion is the last assistant turn (and
                     anything after it), the prompt every message before it
  text               {"text"}: language modelling, the whole text is the completion (the prompt is empty)
  any preference     explicit, hh-rlhf, conversational, openai, ...: the CHOSEN completion is the target (the DPO
                     paper's "preferred-FT"), so one file feeds both stages

An example travels through the preference pipeline (prepare, tokenize, cache) as a `Pair` whose rejected side is the
completion again: the tokenized prompt and completion are then exactly TRL's (the prompt ends where the tokenized
prompt and prompt+completion diverge), and every bound and check of that pipeline applies unchanged. The SFT
layouts (dpo/layouts.py `collate_sft`) read `prompt_ids` and `chosen_ids` only.

Pure functions of decoded records, like formats.py: nothing here reads files or knows about tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpo_cli.data.formats import (
    FORMATS,
    Pair,
    RecordProblem,
    Text,
    check_completion_messages,
    check_messages,
    detect_format,
    get_field,
    text_field,
    wrong_type,
)
from dpo_cli.errors import UserError

NEEDED = "a completion: prompt and completion, messages with an assistant turn, text, or a preference pair's chosen"


def example(prompt: Text, completion: Text) -> Pair:
    """One SFT example in the pipeline's pair form (see the module docstring)."""
    return Pair(prompt, completion, completion)


def prompt_completion_examples(record: dict) -> list[Pair]:
    prompt = get_field(record, "prompt", NEEDED)
    completion = get_field(record, "completion", NEEDED)
    if isinstance(prompt, list) or isinstance(completion, list):
        return [example(check_messages(prompt, "prompt"), check_completion_messages(completion, "completion"))]
    if not isinstance(prompt, str):
        raise wrong_type("prompt", prompt, "a string or a list of messages")
    return [example(prompt, text_field(record, "completion", NEEDED))]


def messages_examples(record: dict) -> list[Pair]:
    messages = check_messages(get_field(record, "messages", NEEDED), "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RecordProblem(
            "no completion", "messages", "has no assistant turn, so there is nothing to learn", "add the answer"
        )
    if last == 0:
        raise RecordProblem(
            "no prompt", "messages", "opens with the assistant's turn", "put the user's (or system's) turn first"
        )
    return [example(messages[:last], check_completion_messages(messages[last:], "messages"))]


def text_examples(record: dict) -> list[Pair]:
    return [example("", text_field(record, "text", NEEDED))]


def chosen_examples(preference_format: str) -> Callable[[dict], list[Pair]]:
    """A preference format read for SFT: each pair's chosen completion is the target."""

    def read(record: dict) -> list[Pair]:
        return [example(pair.prompt, pair.chosen) for pair in FORMATS[preference_format](record)]

    return read


SFT_ONLY_FORMATS: dict[str, Callable[[dict], list[Pair]]] = {
    "prompt-completion": prompt_completion_examples,
    "messages": messages_examples,
    "text": text_examples,
}
SFT_FORMAT_NAMES = tuple(SFT_ONLY_FORMATS)
SFT_FORMATS = {**SFT_ONLY_FORMATS, **{name: chosen_examples(name) for name in FORMATS}}
PREFERENCE_KEYS = {"chosen", "rejected", "preferred_output", "non_preferred_output", "conversations", "response_j"}


def detect_sft_format(record: dict) -> str | None:
    """The format a record's keys point to. A record with a prompt and neither a completion nor a preference pair's
    fields is prompt-completion, so its problem is named as the missing completion."""
    keys = set(record)
    preference = detect_format(record)
    if preference == "oasst" or keys & PREFERENCE_KEYS:
        return preference
    if "messages" in keys:
        return "messages"
    if "completion" in keys or "prompt" in keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    return preference


def unknown_sft_format_error(where: str, record: dict[str, Any]) -> UserError:
    keys = ", ".join(sorted(record)[:8]) or "none"
    return UserError(
        f"{where}: cannot tell the SFT data format from the keys ({keys}); it needs {NEEDED}. Pass --format "
        f"({', '.join(SFT_FORMATS)}) or map names with --columns prompt=...,completion=..."
    )
