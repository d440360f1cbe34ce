"""Reading and checking preference files: every record of every file becomes pairs, or a problem with its place.

Files are opened by `readers` (containers), their format is detected from the first record (or forced), and each
record goes through its format's function in `formats`. Every pair remembers where it came from, so a problem is
reported as `file:line: field 'x': what is wrong; what to do`. With `on_invalid="error"` the first problem stops
the run with that line; with `"skip"` bad records are set aside as `InvalidRecord`s, counted by reason in the
summary and written to a file, so nothing is lost silently. Bad input is normal input: nothing here raises
anything but `UserError` for a problem in the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dpo_cli.data.decode import MAX_RECORD_BYTES
from dpo_cli.data.formats import FORMATS, Pair, RecordProblem, detect_format, rename_columns, unknown_format_error
from dpo_cli.data.readers import open_records
from dpo_cli.data.sft_formats import SFT_FORMATS, detect_sft_format, unknown_sft_format_error
from dpo_cli.errors import UserError


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
    max_record_bytes: int = MAX_RECORD_BYTES
    """A longer record is set aside unread (see `prepare.read_options` for the bound training uses)."""
    kind: str = "preference"
    """preference (pairs, `train` and `eval`) or sft (examples as pairs, sft_formats.py; `dpo-cli sft`)."""


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
    formats, detect, unknown = _record_shapes(options.kind)
    if report.format and report.format not in formats:
        raise UserError(
            f"--format {report.format}: is an SFT data format (for `dpo-cli sft`); preference data is one of "
            f"{', '.join(formats)}"
        )
    result.files.append(report)
    for raw in open_records(Path(path), options.max_record_bytes):
        report.records += 1
        try:
            if raw.problem is not None:
                raise raw.problem
            record = _as_object(raw.value)
            record = rename_columns(record, options.columns)
            if not report.format:
                report.format = detect(record) or ""
                if not report.format:
                    raise unknown(raw.where, record)
            pairs = formats[report.format](record)
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


def _record_shapes(kind: str):
    """(formats by name, detect, unknown-format error) of a kind of data."""
    if kind == "sft":
        return SFT_FORMATS, detect_sft_format, unknown_sft_format_error
    return FORMATS, detect_format, unknown_format_error


def _as_object(value: object) -> dict:
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string"}.get(type(value), type(value).__name__)
        raise RecordProblem("not an object", None, f"expected a JSON object, got {kind}", "one record per line")
    return value


# Characters str.splitlines() also breaks lines on; json.dumps escapes only the ASCII ones. Escaping these too keeps
# one record per line for every reader, while the rest of the text stays readable (no ensure_ascii).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(value: object) -> str:
    """`value` as one line of JSON that any line reader splits correctly and that encodes as UTF-8 (a lone surrogate,
    which UTF-8 cannot hold, makes that line fully ASCII-escaped)."""
    line = json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKS)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return line


def read_json_lines(path: Path) -> list[str]:
    """The non-empty lines of a JSON lines file, split on "\\n" only (not on what str.splitlines() also breaks on)."""
    return [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def read_jsonl(path: Path) -> Iterator[PreferencePair]:
    """The pairs of one file of any format and container, with default settings (the first problem stops)."""
    return iter_file_pairs(Path(path), ReadOptions(), ReadResult())
