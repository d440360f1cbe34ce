"""Records set aside: the `data.on_invalid` policy, the one-line summary by reason, and `skipped-<split>.jsonl`.

Under `on_invalid: error` the first bad record stops the run with its line; under `skip` every one is kept as an
`InvalidRecord` (where, why, its text as it was), counted by reason, and written out to fix and feed back.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

from dpo_cli.data.records import InvalidRecord, json_line, read_json_lines
from dpo_cli.errors import UserError
from dpo_cli.files import write_text_atomic


def refuse_under_error_policy(skipped: list[InvalidRecord], on_invalid: str) -> None:
    """Under `on_invalid: error`, the first record set aside stops the run with its line."""
    if skipped and on_invalid == "error":
        raise UserError(f"{skipped[0].message} (or pass --on-invalid skip to set bad records aside)")


def skipped_file(output_dir: Path | str, name: str) -> Path:
    """Where the records a split set aside are written, in the run's or evaluation's output folder."""
    return Path(output_dir) / f"skipped-{name}.jsonl"


def invalid_by_reason(invalid: list[InvalidRecord]) -> dict[str, list[InvalidRecord]]:
    grouped: dict[str, list[InvalidRecord]] = defaultdict(list)
    for record in invalid:
        grouped[record.reason].append(record)
    return dict(sorted(grouped.items(), key=lambda item: -len(item[1])))


def skipped_summary(invalid: list[InvalidRecord], first: int = 3) -> str:
    """'2 chosen equals rejected (first: f:12, f:99), 1 invalid JSON (first: f:3)'."""
    parts = []
    for reason, records in invalid_by_reason(invalid).items():
        places = ", ".join(record.source for record in records[:first])
        parts.append(f"{len(records)} {reason} (first: {places})")
    return ", ".join(parts)


def write_skipped(path: Path, invalid: list[InvalidRecord]) -> None:
    """One JSON line per skipped record: where it was, why, and its text as it was, to fix and feed back."""
    write_text_atomic(path, "".join(json_line(dataclasses.asdict(record)) + "\n" for record in invalid))


def read_skipped(path: Path) -> list[InvalidRecord]:
    """The records `write_skipped` wrote; a line that is not one raises ValueError, TypeError or KeyError."""
    return [InvalidRecord(**json.loads(line)) for line in read_json_lines(path)]
