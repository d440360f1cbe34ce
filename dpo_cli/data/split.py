"""Which pairs a split is: its files, its name, and under `data.eval_split` which part of the training pairs.

With eval files, "eval" is those files. With `data.eval_split` and none, both parts come from the training files:
"train" the larger part, "eval" the held-out rest, the same pairs for the same data whatever the training seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpo_cli.config import DataSection
from dpo_cli.errors import UserError

SPLIT_SEED = 0
"""The held-out part of `data.eval_split` is the same for the same data, whatever the training seed."""


@dataclass
class SplitRequest:
    """What `load.load_tokenized_split` is asked for."""

    files: list[str]
    name: str
    """"train", "eval" or "checked": named in every line about the split and in `skipped-<name>.jsonl`."""
    data: DataSection
    """How to read and cut: format, columns, on_invalid, chat_template, max_length, cache_dir, eval_split."""
    output_dir: Path | None = None
    """Where `skipped-<name>.jsonl` goes under `on_invalid: skip`; None: it is not written."""
    part: str | None = None
    """Under `data.eval_split`: "train" (the larger part of the files' pairs) or "eval" (the rest); None: all."""
    with_sources: bool = False
    """Give each pair's `source` (file:line) too, so per-pair results can point back at the record."""
    kind: str = "preference"
    """preference pairs, or sft examples (data/sft_formats.py)."""


def training_requests(
    data: DataSection, output_dir: Path | None, kind: str = "preference"
) -> tuple[SplitRequest, SplitRequest | None]:
    """The train split and the eval split (None without eval files or `eval_split`) of a training run."""
    if data.eval_split and not data.eval:
        train = SplitRequest(list(data.train), "train", data, output_dir, part="train", kind=kind)
        return train, SplitRequest(list(data.train), "eval", data, output_dir, part="eval", kind=kind)
    train = SplitRequest(list(data.train), "train", data, output_dir, kind=kind)
    return train, SplitRequest(list(data.eval), "eval", data, output_dir, kind=kind) if data.eval else None


def part_rows(rows: np.ndarray, fraction: float, part: str) -> np.ndarray:
    """The rows of the "eval" (held-out) or "train" part, in file order; the held-out part has at least one row."""
    if len(rows) == 0:  # nothing to split: the caller says that no pair is left
        return rows
    if len(rows) == 1:
        raise UserError("data.eval_split needs at least 2 pairs to split, and there is 1; add data or drop the split")
    held_out = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    chosen = order[:held_out] if part == "eval" else order[held_out:]
    return rows[np.sort(chosen)]
