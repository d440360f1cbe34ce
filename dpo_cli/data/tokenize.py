"""Turning preference pairs into token ids exactly as TRL 1.16's DPOTrainer does, so our numbers are comparable.

Text pairs: the prompt alone, prompt+chosen and prompt+rejected are tokenized, EOS text appended to each completion
first. Chat pairs (message lists): the prompt is rendered with the chat template and the generation prompt,
prompt+chosen and prompt+rejected without it, and no EOS is appended (the template ends turns itself). Either way
the completion starts where the tokenized prompt and prompt+completion diverge, which is not always the end of the
prompt: tokens can merge across the boundary, and some templates render a prompt alone differently. Prompt+completion
is then cut to `max_length` keeping the start; a pair whose prompt alone fills `max_length` has no completion token
left and cannot be trained on.

A hostile record must cost milliseconds, not the minutes and gigabytes of tokenizing megabytes of text that are then
cut away. No token holds more than `chars_per_token` characters (the tokenizer's longest vocabulary entry, at least
64), so a prompt longer than `max_length` times that cannot fit and is set aside untokenized, and a completion is
tokenized only up to twice what the window can hold, which leaves the kept tokens the same as in full.

This module is the tokenizing alone, one pair or one `datasets.map` batch at a time; `prepare` streams files through
it on all cores and `load` is the entry point of `train` and `eval`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dpo_cli.data.arrow import TOKENIZED_COLUMNS, loaded_text
from dpo_cli.data.formats import Text
from dpo_cli.data.records import PreferencePair
from dpo_cli.data.templates import (
    BUILTIN_NAMES,
    ChatTemplate,
    RenderLimits,
    template_of_tokenizer,
    use_chat_template,  # noqa: F401 (it lived here: callers may import it from here)
)
from dpo_cli.errors import UserError

ID_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
PAIR_TEXTS = ("prompt", "chosen", "rejected")
MIN_CHARS_PER_TOKEN = 64
"""A generous bound on the characters one token covers (real tokenizers average 3 to 5), used when the vocabulary's
longest entry is shorter."""
NOT_TOKENIZED = -1
"""The token counts of a pair set aside on its character count alone."""


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __getitem__(self, key: str) -> list[int]:  # the layout reads pairs as mappings, like dataset rows
        return getattr(self, key)


@dataclass
class TokenizeSummary:
    """What `tokenize_pairs` kept, dropped and cut."""

    kept: int = 0
    dropped_long_prompt: list[str] = field(default_factory=list)
    """Sources (file:line) of pairs set aside because the prompt alone fills max_length."""
    truncated: int = 0
    """Pairs kept but with a completion cut at max_length."""


# One pair ---------------------------------------------------------------------------------------------------------


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_at_divergence(
    prompt_ids: list[int], prompt_chosen_ids: list[int], prompt_rejected_ids: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids, the completions starting where either stops agreeing with the prompt."""
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    return prompt_ids[:prompt_len], prompt_chosen_ids[prompt_len:], prompt_rejected_ids[prompt_len:]


def chat_ids(
    tokenizer,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    template: ChatTemplate | None = None,
    limits: RenderLimits = RenderLimits(),
) -> list[int]:
    """Token ids of a rendered conversation, as TRL's `_tokenize` gets them from `apply_chat_template`: the text
    rendered (here by our bounded renderer, `template` or the tokenizer's own), then tokenized without special
    tokens added."""
    template = template or template_of_tokenizer(tokenizer)
    text = template.render(tokenizer, messages, add_generation_prompt, limits)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_pair_ids(
    tokenizer,
    prompt: Text,
    chosen: Text,
    rejected: Text,
    template: ChatTemplate | None = None,
    limits: RenderLimits = RenderLimits(),
) -> tuple[list[int], list[int], list[int]]:
    return split_at_divergence(
        chat_ids(tokenizer, prompt, True, template, limits),
        chat_ids(tokenizer, prompt + chosen, False, template, limits),
        chat_ids(tokenizer, prompt + rejected, False, template, limits),
    )


def text_pairs_ids(
    tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]
) -> list[tuple[list[int], list[int], list[int]]]:
    """Untruncated (prompt, chosen, rejected) ids of many text pairs, tokenized in three batched calls."""
    eos = tokenizer.eos_token
    chosen = [c if c.endswith(eos) else c + eos for c in chosen]
    rejected = [r if r.endswith(eos) else r + eos for r in rejected]
    prompt_ids = tokenizer(prompts)["input_ids"]
    prompt_chosen_ids = tokenizer([p + c for p, c in zip(prompts, chosen, strict=True)])["input_ids"]
    prompt_rejected_ids = tokenizer([p + r for p, r in zip(prompts, rejected, strict=True)])["input_ids"]
    return [split_at_divergence(*ids) for ids in zip(prompt_ids, prompt_chosen_ids, prompt_rejected_ids, strict=True)]


def cut_to_max_length(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
) -> tuple[TokenizedPair | None, bool]:
    """Keep the start of prompt+completion; None when the prompt alone fills `max_length`."""
    if len(prompt) >= max_length:
        return None, False
    room = max_length - len(prompt)
    truncated = len(chosen) > room or len(rejected) > room
    return TokenizedPair(prompt, chosen[:room], rejected[:room]), truncated


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int) -> tuple[TokenizedPair | None, bool]:
    """(token ids, whether a completion was truncated); None when the prompt alone fills `max_length`."""
    if pair.is_chat:
        ids = chat_pair_ids(tokenizer, pair.prompt, pair.chosen, pair.rejected)
    else:
        (ids,) = text_pairs_ids(tokenizer, [pair.prompt], [pair.chosen], [pair.rejected])
    return cut_to_max_length(*ids, max_length)


def tokenize_pairs(
    tokenizer, pairs: Iterable[PreferencePair], max_length: int
) -> tuple[list[TokenizedPair], TokenizeSummary]:
    """Small in-memory lists; `load.load_tokenized_split` is the streaming, cached path for real data."""
    summary = TokenizeSummary()
    tokenized = []
    for pair in pairs:
        ids, truncated = tokenize_pair(tokenizer, pair, max_length)
        if ids is None:
            summary.dropped_long_prompt.append(pair.source)
            continue
        summary.truncated += truncated
        tokenized.append(ids)
    summary.kept = len(tokenized)
    return tokenized, summary


# Chat templates ---------------------------------------------------------------------------------------------------


def require_chat_template(tokenizer, pair: PreferencePair, format_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{pair.source}: {format_name} data is a conversation, and the tokenizer has no chat template to "
            f"render it; pass --chat-template NAME ({', '.join(BUILTIN_NAMES)}) or FILE.jinja (recipe key "
            "data.chat_template)"
        )


# Batches of pairs, the work per pair bounded ----------------------------------------------------------------------


def chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry (byte-level entries are at least as
    long as the text they cover), and never less than MIN_CHARS_PER_TOKEN."""
    return max(MIN_CHARS_PER_TOKEN, max(map(len, tokenizer.get_vocab()), default=0))


def _prompt_too_long(prompt: Text, max_length: int, max_chars: int) -> str:
    """Why `prompt` cannot fit in max_length tokens, told from its characters alone; "" when it may fit."""
    if isinstance(prompt, str):
        size = len(prompt)
    else:
        if len(prompt) > max_length:  # every turn renders to at least one token (its role marker)
            return f"has {len(prompt):,} messages, more than max_length={max_length} tokens can hold"
        size = sum(len(message["content"]) for message in prompt)
    if size <= max_chars:
        return ""
    return (
        f"is {size:,} characters, more than max_length={max_length} tokens can hold (no token of this tokenizer "
        f"covers more than {max_chars // max_length} characters)"
    )


def _head(text: Text, max_chars: int, max_messages: int) -> Text:
    """The start of a completion: at most `max_chars` characters of its text or of its messages' contents, and at
    most `max_messages` messages (each renders to a token at least)."""
    if isinstance(text, str):
        return text[:max_chars]
    kept = []
    for message in text[:max_messages]:
        if max_chars <= 0:
            break
        kept.append({**message, "content": message["content"][:max_chars]})
        max_chars -= len(message["content"])
    return kept


def tokenize_batch(
    batch: dict[str, list],
    tokenizer,
    max_length: int,
    max_token_chars: int = MIN_CHARS_PER_TOKEN,
    template: ChatTemplate | None = None,
) -> dict[str, list]:
    """`datasets.map` function: the texts of a batch of pairs -> cut ids, full lengths and any problem per pair.

    The work per pair is bounded: a prompt of more than `max_length * max_token_chars` characters cannot fit and is
    not tokenized. A completion is cut to twice that before tokenizing: the kept tokens come from its first
    `max_length * max_token_chars` characters at most, and as much text again after them keeps any merge across the
    cut far from the window. Its token count is then counted up to the cut (still more than fits). A conversation
    is rendered with `template` (default: the tokenizer's own) within limits derived from the same window, so the
    rendered text is bounded before it is tokenized; a template going over them stops everything in one line."""
    size = len(batch["prompt"])
    max_prompt_chars = max_length * max_token_chars
    max_completion_chars = 2 * max_prompt_chars
    full: list[tuple[list[int], list[int], list[int]] | None] = [None] * size
    problems = [("", "")] * size
    texts = [[loaded_text(batch[name][i], batch["is_chat"][i]) for name in PAIR_TEXTS] for i in range(size)]
    for i, (prompt, _, _) in enumerate(texts):
        if why := _prompt_too_long(prompt, max_length, max_prompt_chars):
            problems[i] = ("prompt fills max_length", f"field 'prompt': {why}; raise --max-length or shorten it")
        texts[i][1:] = [_head(completion, max_completion_chars, 2 * max_length) for completion in texts[i][1:]]
    text_rows = [i for i in range(size) if not batch["is_chat"][i] and not problems[i][0]]
    if text_rows:
        columns = [[texts[i][field] for i in text_rows] for field in range(3)]
        for i, ids in zip(text_rows, text_pairs_ids(tokenizer, *columns), strict=True):
            full[i] = ids
    limits = RenderLimits.for_window(max_length, max_token_chars)
    for i in range(size):
        if batch["is_chat"][i] and not problems[i][0]:
            try:
                full[i] = chat_pair_ids(tokenizer, *texts[i], template, limits)
            except UserError:  # the template went over its bounds: the template's fault, not this pair's
                raise
            except Exception as error:  # templates raise their own errors (e.g. on roles that do not alternate)
                problems[i] = ("chat template error", f"the chat template refused it ({error}); fix the template")
    out: dict[str, list] = {name: [] for name in TOKENIZED_COLUMNS}
    for i in range(size):
        if full[i] is None and problems[i][0] == "prompt fills max_length":
            _append_untokenized(out, problems[i])
            continue
        prompt, chosen, rejected = full[i] or ([], [], [])
        cut, truncated = cut_to_max_length(prompt, chosen, rejected, max_length)
        if cut is None and not problems[i][0]:
            problems[i] = (
                "prompt fills max_length",
                f"field 'prompt': is {len(prompt)} tokens, which fills max_length={max_length} and leaves no room "
                "for a completion; raise --max-length or shorten the prompt",
            )
        cut = cut or TokenizedPair([], [], [])
        for name in ID_COLUMNS:
            out[name].append(cut[name])
        out["prompt_tokens"].append(len(prompt))
        out["chosen_tokens"].append(len(chosen))
        out["rejected_tokens"].append(len(rejected))
        out["truncated"].append(truncated)
        out["problem"].append(problems[i][0])
        out["problem_message"].append(problems[i][1])
    return out


def _append_untokenized(out: dict[str, list], problem: tuple[str, str]) -> None:
    for name in ID_COLUMNS:
        out[name].append([])
    for name in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        out[name].append(NOT_TOKENIZED)
    out["truncated"].append(False)
    out["problem"].append(problem[0])
    out["problem_message"].append(problem[1])
