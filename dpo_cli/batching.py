"""Batch layouts: which tokens sit in a row, their positions, the attention mask, and where each completion's
log-probs are summed.

A layout turns tokenized pairs into a `PreferenceBatch`. Everything downstream (the forward pass, the fused
log-probs, the losses) reads only the batch's fields, so a new layout (padding-free packing, shared-prompt rows
`[prompt | chosen | rejected]`) is a new `collate` function and nothing else.

The contract, for a batch of P pairs:
- position t of a row predicts `target_ids[t]` (the next token), and `completion_index[t]` says which completion
  that token belongs to: 0..P-1 are the chosen completions, P..2P-1 the rejected ones, -1 means "not scored";
- read in row-major order, the scored positions of one completion are contiguous and in order.
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
    # (P,) float32 reference log-probs computed before training (`dpo.precompute_ref`); None: run the reference
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

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

    def completion_lengths(self) -> torch.Tensor:
        """(2P,) number of scored tokens per completion, chosen first."""
        index = self.completion_index[self.scored]
        return torch.bincount(index, minlength=2 * self.num_pairs)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch: what tokens/s counts."""
        return int(self.attention_mask.sum())


def collate_padded(pairs: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> PreferenceBatch:
    """TRL's layout: rows [prompt+chosen for each pair] then [prompt+rejected for each pair], right-padded."""
    num_pairs = len(pairs)
    rows: list[tuple[list[int], int]] = []  # (token ids, prompt length)
    for key in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            rows.append((list(pair["prompt_ids"]) + list(pair[key]), len(pair["prompt_ids"])))
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
    ref_chosen, ref_rejected = precomputed_reference(pairs)
    return PreferenceBatch(
        input_ids,
        attention_mask,
        target_ids,
        completion_index,
        num_pairs,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )


REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def precomputed_reference(pairs: Sequence[Mapping]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(chosen, rejected) reference log-probs (P,) carried by the pair items, or (None, None) if they carry none.

    Any layout puts them in the batch the same way: they are per pair, not per token.
    """
    carried = [isinstance(pair, Mapping) and all(key in pair for key in REFERENCE_KEYS) for pair in pairs]
    if not any(carried):
        return None, None
    if not all(carried):  # a bug in the caller: half a batch with a reference would silently mix two objectives
        raise ValueError("some pairs carry precomputed reference log-probs and some do not")
    return tuple(torch.tensor([float(pair[key]) for pair in pairs], dtype=torch.float32) for key in REFERENCE_KEYS)
