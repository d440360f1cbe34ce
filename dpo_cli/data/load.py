"""The entry point of `train` and `eval`: the pairs of one split, ready to batch, and a report of what became of them.

`load_tokenized_split` prepares the files (read, checked, tokenized as TRL does, cached; see `prepare`), applies
`data.on_invalid`, takes the requested part of `data.eval_split`, writes what was skipped, and returns a
`datasets.Dataset` of `{prompt_ids, chosen_ids, rejected_ids}` rows with a `SplitReport`. It prints nothing: the
command renders the report (`dpo_cli.run.data_report`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpo_cli.data.prepare import PreparedSplit, Progress, no_progress, prepare_split
from dpo_cli.data.records import InvalidRecord
from dpo_cli.data.skipped import refuse_under_error_policy, skipped_file, write_skipped
from dpo_cli.data.split import SplitRequest, part_rows
from dpo_cli.data.tokenize import ID_COLUMNS
from dpo_cli.errors import UserError


@dataclass
class SplitReport:
    """What became of a split's records: kept, cut, set aside, repeated; and how it was prepared."""

    name: str
    max_length: int
    kept: int = 0
    dropped_long_prompt: list[str] = field(default_factory=list)
    """Sources (file:line) of pairs set aside because the prompt alone fills max_length."""
    truncated: int = 0
    """Pairs kept but with a completion cut at max_length."""
    skipped: list[InvalidRecord] = field(default_factory=list)
    """Every record or pair set aside under `on_invalid: skip`, long prompts included (the held-out part of
    `data.eval_split` has none: they are the train part's, said once)."""
    skipped_file: Path | None = None
    """Where `skipped` was written; None when it was not."""
    set_aside: int = 0
    """Records or pairs set aside reading the files, whichever part this is."""
    duplicates: int = 0
    """Kept pairs that repeat an earlier one exactly."""
    formats: list[str] = field(default_factory=list)
    from_cache: bool = False
    seconds: float = 0.0
    """Preparing (or opening) the split took this long."""
    unit: str = "pairs"
    """What one row is called in the lines about the split: pairs, or examples (sft)."""
    pairs_key: str = ""
    """Names exactly these pairs' token ids: the prepared folder's key and the rows kept from it (what the reference
    log-prob cache is keyed by)."""

    def require_pairs(self) -> None:
        """A split with no pair left stops the command, after its report has been shown."""
        if not self.kept:
            skipped = f"{self.set_aside:,} records or pairs were skipped"
            raise UserError(f"{self.name} data: no pair is left to use; {skipped}")


def load_tokenized_split(tokenizer, request: SplitRequest, progress: Progress = no_progress):
    """(a datasets.Dataset of {prompt_ids, chosen_ids, rejected_ids} rows, a SplitReport) for `request`.

    Under `on_invalid: error` the first record set aside raises its line; under `skip`, the records set aside are
    written to `request.output_dir/skipped-<name>.jsonl`. `progress` hears what is happening as it happens. The
    rows may be none: the caller shows the report, then `report.require_pairs()`.
    """
    prepared = prepare_split(tokenizer, request.files, request.data, request.name, progress, request.kind)
    problem_rows = prepared.problem_rows()
    skipped = prepared.read.invalid + prepared.tokenization_problems(problem_rows)
    refuse_under_error_policy(skipped, request.data.on_invalid)
    keep = np.setdiff1d(np.arange(len(prepared.tokenized)), problem_rows)
    if request.part is not None:
        keep = part_rows(keep, request.data.eval_split, request.part)
    report = _report(request, prepared, keep, skipped)
    if report.skipped_file is not None:
        write_skipped(report.skipped_file, report.skipped)
    pairs = prepared.tokenized.select(keep.tolist()).select_columns(ID_COLUMNS)
    if request.with_sources:
        pairs = pairs.add_column("source", prepared.texts.select(keep.tolist())["source"])
    return pairs, report


def _report(
    request: SplitRequest, prepared: PreparedSplit, keep: np.ndarray, skipped: list[InvalidRecord]
) -> SplitReport:
    hashes = np.asarray(prepared.tokenized.data.column("pair_hash").to_numpy())[keep]
    truncated = np.asarray(prepared.tokenized.data.column("truncated").to_numpy(zero_copy_only=False))[keep]
    skipped_here = skipped if request.part != "eval" else []  # the held-out part's skips are the train part's
    written_to = None
    if skipped_here and request.output_dir is not None:
        written_to = skipped_file(request.output_dir, request.name)
    return SplitReport(
        name=request.name,
        max_length=request.data.max_length,
        kept=len(keep),
        dropped_long_prompt=[r.source for r in skipped_here if r.reason == "prompt fills max_length"],
        truncated=int(truncated.sum()),
        skipped=skipped_here,
        skipped_file=written_to,
        set_aside=len(skipped),
        duplicates=len(hashes) - len(np.unique(hashes)),
        formats=sorted({report.format for report in prepared.read.files}),
        from_cache=prepared.from_cache,
        seconds=prepared.seconds,
        pairs_key=pairs_key(prepared.key, keep),
        unit="examples" if request.kind == "sft" else "pairs",
    )


def pairs_key(prepared_key: str, rows: np.ndarray) -> str:
    """A hash of the prepared folder's key and the rows a split keeps of it (on_invalid, the eval_split part)."""
    digest = hashlib.blake2b(prepared_key.encode(), digest_size=16)
    digest.update(np.asarray(rows, dtype=np.int64).tobytes())
    return digest.hexdigest()
