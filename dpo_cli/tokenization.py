"""Turning text pairs into token ids exactly as TRL 1.16's DPOTrainer does, so our numbers are comparable to its.

For each pair the prompt alone, prompt+chosen and prompt+rejected are tokenized (EOS text appended to each
completion first). The completion starts where the tokenized prompt and prompt+completion diverge, which is not
always the end of the prompt: tokens can merge across the boundary. Prompt+completion is then cut to `max_length`
keeping the start; a pair whose prompt alone fills `max_length` has no completion token left and is dropped, and
the count is reported rather than hidden.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console

from dpo_cli.data import PreferencePair, read_pairs
from dpo_cli.errors import UserError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    """Where the pair came from (`file:line`), so per-pair results can point back at it."""

    def __getitem__(self, key: str) -> list[int]:  # the layout reads pairs as mappings, like dataset rows
        return getattr(self, key)


@dataclass
class TokenizeSummary:
    kept: int = 0
    dropped_long_prompt: list[str] = field(default_factory=list)
    """Sources (file:line) of pairs dropped because the prompt alone fills max_length."""
    truncated: int = 0
    """Pairs kept but with a completion cut at max_length."""


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int) -> tuple[TokenizedPair | None, bool]:
    """(token ids, whether a completion was truncated); None when the prompt alone fills `max_length`."""
    eos = tokenizer.eos_token
    chosen = pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos
    rejected = pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos
    prompt_ids = tokenizer(pair.prompt)["input_ids"]
    prompt_chosen_ids = tokenizer(pair.prompt + chosen)["input_ids"]
    prompt_rejected_ids = tokenizer(pair.prompt + rejected)["input_ids"]
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    if prompt_len >= max_length:
        return None, False
    room = max_length - prompt_len
    chosen_ids = prompt_chosen_ids[prompt_len:]
    rejected_ids = prompt_rejected_ids[prompt_len:]
    truncated = len(chosen_ids) > room or len(rejected_ids) > room
    return TokenizedPair(prompt_ids[:prompt_len], chosen_ids[:room], rejected_ids[:room], pair.source), truncated


def tokenize_pairs(
    tokenizer, pairs: Iterable[PreferencePair], max_length: int
) -> tuple[list[TokenizedPair], TokenizeSummary]:
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


def load_tokenized_split(tokenizer, paths: list[str], max_length: int, name: str, console: Console):
    """Read, check and tokenize the files of one split, telling the user what was dropped or cut."""
    pairs, summary = tokenize_pairs(tokenizer, read_pairs(paths), max_length)
    report_tokenization(summary, name, max_length, console)
    if not pairs:
        raise UserError(
            f"{name} data: every pair's prompt fills max_length={max_length}; raise --max-length or shorten prompts"
        )
    return pairs, summary


def report_tokenization(summary: TokenizeSummary, name: str, max_length: int, console: Console) -> None:
    console.print(f"{name} data: {summary.kept} pairs", end="")
    if summary.truncated:
        console.print(f", {summary.truncated} with a completion cut at max_length={max_length}", end="")
    console.print()
    if summary.dropped_long_prompt:
        first = ", ".join(summary.dropped_long_prompt[:3])
        console.print(
            f"[yellow]{name} data: dropped {len(summary.dropped_long_prompt)} pairs whose prompt alone fills "
            f"max_length={max_length} (first: {first})[/yellow]"
        )
