"""Batch layouts: which tokens sit in a row, their positions, the attention mask, and where each completion's
log-probs are summed.

A layout turns tokenized pairs into a `PreferenceBatch`. Everything downstream (the forward pass, the fused
log-probs, the losses) reads only the batch's fields, so a layout is a `collate` function and nothing else:
- `padded` (TRL's): one sequence per row, [prompt+chosen for each pair] then [prompt+rejected], right-padded;
- `packed`: the same 2P sequences laid end to end in rows, no padding between them, positions restarting per
  sequence, each sequence attending only to itself (block-diagonal causal attention);
- `shared-prompt`: one segment per pair, `[prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected]`, segments packed
  in rows. The prompt runs once; each branch sees the shared prompt and itself, never the other branch, and its
  positions continue from the prompt's. The prompt's last token is repeated at the head of each branch because its
  hidden state predicts the first completion token, a different one per branch (one target per position).

The contract, for a batch of P pairs:
- position t of a row predicts `target_ids[t]` (the next token), and `completion_index[t]` says which completion
  that token belongs to: 0..P-1 are the chosen completions, P..2P-1 the rejected ones, -1 means "not scored";
- read in row-major order, the scored positions of one completion are contiguous and in order;
- with `segment_ids` set, token k is visible from token q of the same row exactly when `attention_allowed()` says
  so; the model must be given that mask (dpo_cli.dpo.attention), never position ids alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class PreferenceBatch:
    input_ids: torch.Tensor  # (R, T) long
    attention_mask: torch.Tensor  # (R, T) long, 1 = real token
    target_ids: torch.Tensor  # (R, T) long, the token predicted at each position (0 where not scored)
    completion_index: torch.Tensor  # (R, T) long, completion of the predicted token, -1 where not scored
    num_pairs: int
    position_ids: torch.Tensor | None = None  # (R, T) long; None lets the model count 0.. per row
    # Packed layouts only (None: each row is one causal sequence, padding masked by `attention_mask`):
    segment_ids: torch.Tensor | None = None  # (R, T) long, the sequence or pair segment of each token, -1 on padding
    branch_ids: torch.Tensor | None = None  # (R, T) long, SHARED, CHOSEN_BRANCH or REJECTED_BRANCH
    # Shared-prompt only: tokens of the 2P sequences prompt+chosen, prompt+rejected (each prompt counted twice)
    sequence_tokens: int | None = None
    # 2 for preference pairs; 1 for SFT examples (`collate_sft`), where `num_pairs` counts the examples
    completions_per_pair: int = 2

    def to(self, device: torch.device | str) -> PreferenceBatch:
        moved = {
            f.name: value.to(device) if isinstance(value := getattr(self, f.name), torch.Tensor) else value
            for f in fields(self)
        }
        return PreferenceBatch(**moved)

    @property
    def scored(self) -> torch.Tensor:
        """(R, T) bool: the positions whose next token is a completion token."""
        return self.completion_index >= 0

    @property
    def num_completions(self) -> int:
        """2P for pairs (chosen first, then rejected); the number of examples of an SFT batch."""
        return self.completions_per_pair * self.num_pairs

    def completion_lengths(self) -> torch.Tensor:
        """(2P,) number of scored tokens per completion, chosen first."""
        index = self.completion_index[self.scored]
        return torch.bincount(index, minlength=self.num_completions)

    @property
    def num_tokens(self) -> int:
        """Tokens of the pairs' 2P sequences, whatever the layout (padding aside): what tokens/s counts, as TRL
        counts it, so a layout that runs fewer tokens shows as more tokens/s, not as less work."""
        if self.sequence_tokens is not None:
            return self.sequence_tokens
        return int(self.attention_mask.sum())

    @property
    def is_packed(self) -> bool:
        return self.segment_ids is not None

    def attention_allowed(self) -> torch.Tensor:
        """(R, T, T) bool, [r, q, k] = token q of row r may attend to token k: the definition every backend's mask
        is built from. Causal within a segment; a branch token sees its segment's shared tokens and its own branch.

        Padding attends to itself only, so no attention row is empty (an all-masked row is NaN, and NaN in the
        attention backward would spread to every key)."""
        if self.segment_ids is None:
            real = self.attention_mask.bool()
            causal = torch.ones(real.shape[1], real.shape[1], dtype=torch.bool, device=real.device).tril()
            allowed = causal & real[:, None, :] & real[:, :, None]
        else:
            # Built in place: at a long shared-prompt row's width, each (R, T, T) temporary is the mask's own size.
            segment, branch = self.segment_ids, self.branch_ids
            width = segment.shape[1]
            allowed = segment[:, :, None] == segment[:, None, :]
            allowed &= segment[:, :, None] >= 0
            allowed &= torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
            visible_branch = branch[:, None, :] == branch[:, :, None]
            visible_branch |= branch[:, None, :] == SHARED
            allowed &= visible_branch
            del visible_branch
        allowed |= torch.eye(allowed.shape[1], dtype=torch.bool, device=allowed.device)
        return allowed


def collate_padded(pairs: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> PreferenceBatch:
    """TRL's layout: rows [prompt+chosen for each pair] then [prompt+rejected for each pair], right-padded."""
    rows: list[tuple[list[int], int]] = []  # (token ids, prompt length)
    for key in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            rows.append((list(pair["prompt_ids"]) + list(pair[key]), len(pair["prompt_ids"])))
    return _padded_rows(rows, len(pairs), pad_token_id)


def _padded_rows(rows: list[tuple[list[int], int]], num_pairs: int, pad_token_id: int) -> PreferenceBatch:
    """One right-padded row per (token ids, prompt length), row i scored as completion i."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_ids = torch.zeros((len(rows), width), dtype=torch.long)
    completion_index = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(rows):
        length = len(ids)
        input_ids[row, :length] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        # Position t predicts token t+1; the completion tokens are ids[prompt_len:], predicted from prompt_len-1.
        # A completion starting at token 0 (nothing before it) cannot have its first token predicted, as in TRL.
        target_ids[row, : length - 1] = input_ids[row, 1:length]
        completion_index[row, max(prompt_len, 1) - 1 : length - 1] = row
    return PreferenceBatch(
        input_ids,
        attention_mask,
        target_ids,
        completion_index,
        num_pairs,
        completions_per_pair=len(rows) // num_pairs,
    )


# What a token of a packed segment belongs to: the part every branch sees, or one completion's branch.
SHARED, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2

LAYOUTS = ("padded", "packed", "shared-prompt")


@dataclass
class _Piece:
    """A run of tokens laid in a row as one block: (part of) a sequence or segment."""

    ids: list[int]
    positions: list[int]
    branch: int
    scored_from: int  # the first position (within the piece) whose next token is scored
    scored_to: int  # one past the last scored position
    completion: int  # completion index of the scored tokens (-1: none)


def _unit_length(unit: list[_Piece]) -> int:
    return sum(len(piece.ids) for piece in unit)


def _sequence_unit(prompt: list[int], completion: list[int], index: int) -> list[_Piece]:
    """One padded row's sequence prompt+completion as a packed unit, scored exactly as `collate_padded` scores it."""
    ids = prompt + completion
    return [_Piece(ids, list(range(len(ids))), SHARED, max(len(prompt), 1) - 1, len(ids) - 1, index)]


def _shared_prompt_unit(pair: Mapping[str, list[int]], pair_index: int, num_pairs: int) -> list[_Piece]:
    """[prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected] with each branch's positions going on from the
    prompt's. Every position of a branch but its last predicts a completion token: the repeated last prompt token
    predicts the first one, as the prompt's last token does in a padded row. An empty prompt has no token to repeat,
    so the branch is the completion alone and its first token is not predicted, as in a padded row."""
    prompt = list(pair["prompt_ids"])
    shared, head = prompt[:-1], prompt[-1:]
    start = len(shared)
    unit = [_Piece(shared, list(range(start)), SHARED, 0, 0, -1)]
    for key, branch, index in (
        ("chosen_ids", CHOSEN_BRANCH, pair_index),
        ("rejected_ids", REJECTED_BRANCH, num_pairs + pair_index),
    ):
        ids = head + list(pair[key])
        unit.append(_Piece(ids, list(range(start, start + len(ids))), branch, 0, len(ids) - 1, index))
    return unit


def _pack_units(units: list[list[_Piece]], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, each row holding at most max(row_tokens, longest unit) tokens.

    Deterministic (ties keep the units' order). With `row_tokens` 0 the budget is the longest unit, which is the
    padded layout's width: never more rows nor wider rows than padding, so attention never costs more than there."""
    lengths = [_unit_length(unit) for unit in units]
    budget = max([row_tokens, *lengths])
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(units)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(budget)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def _collate_units(
    units: list[list[_Piece]], pairs: Sequence[Mapping], pad_token_id: int, row_tokens: int, per_pair: int = 2
) -> PreferenceBatch:
    rows = _pack_units(units, row_tokens)
    width = max(sum(_unit_length(units[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    target_ids = torch.zeros(shape, dtype=torch.long)
    completion_index = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    for row, unit_indices in enumerate(rows):
        column = 0
        for unit_index in unit_indices:
            for piece in units[unit_index]:
                stop = column + len(piece.ids)
                ids = torch.tensor(piece.ids, dtype=torch.long)
                input_ids[row, column:stop] = ids
                attention_mask[row, column:stop] = 1
                position_ids[row, column:stop] = torch.tensor(piece.positions, dtype=torch.long)
                segment_ids[row, column:stop] = unit_index
                branch_ids[row, column:stop] = piece.branch
                if piece.scored_to > piece.scored_from:
                    scored = slice(column + piece.scored_from, column + piece.scored_to)
                    target_ids[row, scored] = ids[piece.scored_from + 1 : piece.scored_to + 1]
                    completion_index[row, scored] = piece.completion
                column = stop
    return PreferenceBatch(
        input_ids,
        attention_mask,
        target_ids,
        completion_index,
        len(pairs),
        position_ids=position_ids,
        segment_ids=segment_ids,
        branch_ids=branch_ids,
        completions_per_pair=per_pair,
    )


def collate_packed(pairs: Sequence[Mapping[str, list[int]]], pad_token_id: int, row_tokens: int = 0) -> PreferenceBatch:
    """The 2P sequences of the padded layout laid end to end in rows of up to max(row_tokens, longest) tokens."""
    num_pairs = len(pairs)
    units = [
        _sequence_unit(list(pair["prompt_ids"]), list(pair[key]), offset + i)
        for offset, key in ((0, "chosen_ids"), (num_pairs, "rejected_ids"))
        for i, pair in enumerate(pairs)
    ]
    return _collate_units(units, pairs, pad_token_id, row_tokens)


def collate_shared_prompt(
    pairs: Sequence[Mapping[str, list[int]]], pad_token_id: int, row_tokens: int = 0
) -> PreferenceBatch:
    """One `[prompt | chosen | rejected]` segment per pair, segments packed in rows of up to max(row_tokens,
    longest) tokens."""
    units = [_shared_prompt_unit(pair, i, len(pairs)) for i, pair in enumerate(pairs)]
    batch = _collate_units(units, pairs, pad_token_id, row_tokens)
    batch.sequence_tokens = sum(
        pair_tokens(len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])) for pair in pairs
    )
    return batch


def collate(layout: str, pairs: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> PreferenceBatch:
    """The batch of `pairs` in `layout` (one of LAYOUTS, already resolved from `auto`)."""
    if layout == "padded":
        return collate_padded(pairs, pad_token_id)
    if layout == "packed":
        return collate_packed(pairs, pad_token_id)
    if layout == "shared-prompt":
        return collate_shared_prompt(pairs, pad_token_id)
    raise ValueError(f"unknown layout {layout!r}")


SFT_LAYOUTS = ("padded", "packed")


def sft_sequences(examples: Sequence[Mapping[str, list[int]]], loss_on_prompt: bool) -> list[tuple[list[int], int]]:
    """(token ids, length of the part not trained on) of each SFT example: prompt+completion, the loss on the
    completion, or with `loss_on_prompt` on every token but the first (which nothing predicts)."""
    return [
        (list(example["prompt_ids"]) + list(example["chosen_ids"]), 0 if loss_on_prompt else len(example["prompt_ids"]))
        for example in examples
    ]


def collate_sft(
    layout: str, examples: Sequence[Mapping[str, list[int]]], pad_token_id: int, loss_on_prompt: bool = False
) -> PreferenceBatch:
    """An SFT batch: one sequence per example (its `chosen_ids` are the completion), example i scored as
    completion i. `padded`: one right-padded row each (TRL's SFT without packing); `packed`: laid end to end in
    rows with no padding between them, each attending only to itself, as `collate_packed` lays pairs."""
    sequences = sft_sequences(examples, loss_on_prompt)
    if layout == "padded":
        return _padded_rows(sequences, len(examples), pad_token_id)
    if layout == "packed":
        units = [_sequence_unit(ids[:untrained], ids[untrained:], i) for i, (ids, untrained) in enumerate(sequences)]
        return _collate_units(units, examples, pad_token_id, 0, per_pair=1)
    raise ValueError(f"unknown SFT layout {layout!r}")


def pair_tokens(prompt_length: int, chosen_length: int, rejected_length: int) -> int:
    """Tokens of a pair's two sequences, prompt+chosen and prompt+rejected: what a token budget counts."""
    return 2 * prompt_length + chosen_length + rejected_length


def token_budget_batches(tokens_per_pair: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches of pair indices holding up to `max_tokens` tokens each (a longer pair goes alone), pairs taken
    shortest first so each micro-batch's sequences are alike in length (little padding, even packed rows).

    A function of the lengths alone, so the same data gives the same micro-batches in every epoch and on resume;
    the training stream orders them with the epoch's seed."""
    order = sorted(range(len(tokens_per_pair)), key=lambda i: (tokens_per_pair[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + tokens_per_pair[index] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += tokens_per_pair[index]
    if current:
        batches.append(current)
    return batches
