"""Reading and checking preference files: every record of every file becomes pairs, or a problem with its place.

Files are opened by `readers` (containers), their format is detected from the first record (or forced), and each
record goes through its format's function in `formats`. Every pair remembers where it came from, so a problem is
reported as `file:line: field 'x': what is wrong; what to do`. With `on_invalid="error"` the first problem stops
the run with that line; with `"skip"` bad records are set aside as `InvalidRecord`s, counted by reason in the
summary and written to a file, so nothing is lost silently. Bad input is normal input: nothing here raises
anything but `UserError` for a problem in the data.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dpo_cli.errors import UserError
from dpo_cli.files import write_text_atomic
from dpo_cli.formats import FORMATS, Pair, RecordProblem, detect_format, rename_columns, unknown_format_error
from dpo_cli.readers import open_records

ON_INVALID_CHOICES = ("error", "skip")


@dataclass(frozen=True)
class PreferencePair(Pair):
    source: str
    """Where the record came from, as `file:line`, for error messages."""


@dataclass
class ReadOptions:
    format: str = "auto"
    """A name from `formats.FORMATS`, or auto to detect each file's format from its first record."""
    columns: dict[str, str] = field(default_factory=dict)
    """{pair field: column in the file}, applied before detection."""
    on_invalid: str = "error"


@dataclass
class InvalidRecord:
    file: str
    source: str
    reason: str
    message: str
    """The one-line explanation, with place, field and fix."""
    record: str
    """The record's text as it was in the file."""


@dataclass
class FileReport:
    path: str
    format: str = ""
    records: int = 0
    pairs: int = 0
    invalid: int = 0


@dataclass
class ReadResult:
    """What reading a split found besides its pairs."""

    files: list[FileReport] = field(default_factory=list)
    invalid: list[InvalidRecord] = field(default_factory=list)


def iter_file_pairs(path: Path, options: ReadOptions, result: ReadResult) -> Iterator[PreferencePair]:
    """The pairs of one file, in order; problems raise or are added to `result.invalid`, per `options.on_invalid`."""
    report = FileReport(str(path), format="" if options.format == "auto" else options.format)
    result.files.append(report)
    for raw in open_records(Path(path)):
        report.records += 1
        try:
            if raw.problem is not None:
                raise raw.problem
            record = _as_object(raw.value)
            record = rename_columns(record, options.columns)
            if not report.format:
                report.format = detect_format(record) or ""
                if not report.format:
                    raise unknown_format_error(raw.where, record)
            pairs = FORMATS[report.format](record)
        except RecordProblem as problem:
            report.invalid += 1
            invalid = InvalidRecord(str(path), raw.where, problem.reason, problem.line(raw.where), raw.text)
            if options.on_invalid == "error":
                raise UserError(f"{invalid.message} (or pass --on-invalid skip to set bad records aside)") from None
            result.invalid.append(invalid)
            continue
        report.pairs += len(pairs)
        for pair in pairs:
            yield PreferencePair(pair.prompt, pair.chosen, pair.rejected, raw.where)
    if report.records == 0:
        raise UserError(f"{path}: no records; the file is empty")


def _as_object(value: object) -> dict:
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string"}.get(type(value), type(value).__name__)
        raise RecordProblem("not an object", None, f"expected a JSON object, got {kind}", "one record per line")
    return value


# Reporting what was set aside ---------------------------------------------------------------------------------------


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
    lines = (json.dumps(dataclasses.asdict(record), ensure_ascii=False) for record in invalid)
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path) -> Iterator[PreferencePair]:
    """The pairs of one file of any format and container, with default settings (the first problem stops)."""
    return iter_file_pairs(Path(path), ReadOptions(), ReadResult())
