"""Opening preference files of every container, one decoded record at a time.

`.jsonl` (one JSON value per line), `.json` (a JSON array, read element by element so a large array never sits in
memory whole; a `.json` file that does not start with `[` is read as JSON lines), either of them `.gz` or `.zst`
compressed (recognised by their magic bytes, whatever the name), `.parquet`, and a folder written by
`datasets.save_to_disk`. Every record carries where it came from (`file:line`, or `file: row N`) and its raw text,
so a bad one can be reported and written out as it was. A record that cannot be decoded is yielded with its
problem rather than raised: whether it stops the run is the caller's choice.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dpo_cli.errors import UserError
from dpo_cli.formats import RecordProblem

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
SUPPORTED = ".jsonl, .json, .parquet (optionally .gz or .zst) or a folder saved by datasets.save_to_disk"
JSON_ARRAY_CHUNK = 1 << 20


@dataclass
class RawRecord:
    where: str
    """file:line, or 'file: row N' where lines mean nothing (parquet, Arrow)."""
    text: str
    """The record as it was in the file, for the skipped-records file."""
    value: Any = None
    problem: RecordProblem | None = None


def open_records(path: Path) -> Iterator[RawRecord]:
    """Every record of one file or dataset folder; file-level problems (missing, binary, ...) raise UserError."""
    path = check_readable(path)
    if path.is_dir():
        return _saved_dataset_records(path)
    head = _read_head(path)
    if head.startswith(PARQUET_MAGIC):
        return _parquet_records(path)
    if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
        return _text_records(path, _open_compressed(path, head))
    if b"\x00" in head:
        raise UserError(f"{path}: binary data, not text; pass {SUPPORTED}")
    return _text_records(path, path.open("rb"))


def _is_json_lines_name(path: Path) -> bool:
    """A .jsonl name (also .jsonl.gz, .jsonl.zst) says one value per line, even when a line is a JSON array."""
    suffixes = [s.lower() for s in path.suffixes]
    return ".jsonl" in suffixes[-2:]


def check_readable(path: Path) -> Path:
    """The path, if it is a file or a dataset folder that can be read; else the one-line reason why not."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found; check the path")
    if path.is_dir():
        if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise UserError(f"{path}: is a folder but not one saved by datasets.save_to_disk; pass {SUPPORTED}")
    else:
        _read_head(path)
    return path


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(4096)
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None


def _open_compressed(path: Path, head: bytes) -> IO[bytes]:
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)


def _text_records(path: Path, raw: IO[bytes]) -> Iterator[RawRecord]:
    """JSON lines, or a JSON array when the name is not .jsonl and the first non-blank character is '['."""
    stream = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
    try:
        with stream:
            if not _is_json_lines_name(path) and _first_significant_byte(stream) == b"[":
                yield from _json_array_records(path, stream)
            else:
                yield from _json_line_records(path, stream)
    except _stream_errors() as error:  # a corrupt or cut-off .gz/.zst shows up while reading
        raise UserError(f"{path}: cannot read ({error}); the file is damaged or incomplete") from None


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError]  # gzip: BadGzipFile is an OSError, a cut end EOFError
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _first_significant_byte(stream: io.BufferedReader) -> bytes:
    """The first byte that is not whitespace or a UTF-8 byte order mark, without consuming anything."""
    peeked = stream.peek(JSON_ARRAY_CHUNK)[:JSON_ARRAY_CHUNK]
    return peeked.lstrip(b" \t\r\n\xef\xbb\xbf")[:1]


def _json_line_records(path: Path, stream: IO[bytes]) -> Iterator[RawRecord]:
    for line_number, raw_line in enumerate(stream, start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            text = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
            yield RawRecord(where, text, problem=_not_utf8())
            continue
        if line_number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        text = line.rstrip("\r\n")
        try:
            yield RawRecord(where, text, value=json.loads(text))
        except json.JSONDecodeError as error:
            yield RawRecord(where, text, problem=_invalid_json(error, text))


def _json_array_records(path: Path, stream: IO[bytes]) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, decoded one by one from a sliding text buffer.

    An element cut by the end of the buffer fails to decode; then more text is read and it is tried again. A
    decoding error with no more text to read is a real one. After a real error the rest of the array cannot be
    found reliably, so reading stops there with that one problem.
    """
    reader = _ArrayReader(path, io.TextIOWrapper(stream, encoding="utf-8-sig"))
    reader.skip_blank()
    reader.pos += 1  # the opening '[', which the caller has seen
    reader.skip_blank()
    if reader.peek() == "]":
        return
    index = 0
    while True:
        reader.skip_blank()
        where = f"{path}:{reader.line} (record {index})"
        if reader.peek() == "":
            yield RawRecord(where, "", problem=_cut_off())
            return
        try:
            value, text = reader.decode()
        except json.JSONDecodeError as error:
            yield reader.error_record(index, error)
            return
        yield RawRecord(where, text, value=value)
        reader.line += text.count("\n")
        index += 1
        reader.skip_blank()
        separator = reader.peek()
        if separator == "]":
            return
        if separator != ",":
            found = f"found {separator!r}" if separator else "the file ends"
            problem = RecordProblem("invalid JSON", None, f"expected ',' or ']' after a record, {found}", "fix it")
            yield RawRecord(f"{path}:{reader.line} (record {index})", "", problem=problem)
            return
        reader.pos += 1


class _ArrayReader:
    """A text buffer over a stream that keeps the current position and line number."""

    def __init__(self, path: Path, text: IO[str]):
        self.path, self.text = path, text
        self.buffer, self.pos, self.line, self.at_eof = "", 0, 1, False
        self.decoder = json.JSONDecoder()

    def fill(self) -> bool:
        try:
            chunk = self.text.read(JSON_ARRAY_CHUNK)
        except UnicodeDecodeError:
            raise UserError(f"{self.path}:{self.line}: not UTF-8 text; is it a binary file? pass {SUPPORTED}") from None
        if not chunk:  # leave the buffer as it is: a decoding error's position still points into it
            self.at_eof = True
            return False
        self.buffer, self.pos = self.buffer[self.pos :] + chunk, 0
        return True

    def peek(self) -> str:
        if self.pos >= len(self.buffer):
            self.fill()
        return self.buffer[self.pos : self.pos + 1]

    def skip_blank(self) -> None:
        while self.peek() in (" ", "\t", "\r", "\n"):
            self.line += self.buffer[self.pos] == "\n"
            self.pos += 1

    def decode(self) -> tuple[Any, str]:
        """The JSON value at the current position and its text; `fill` keeps the buffer from `pos` on, so the
        value always starts at `pos`, however many times more text is read."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError:
                if self.at_eof or not self.fill():
                    raise
                continue
            if end == len(self.buffer) and not self.at_eof and self.fill():
                continue  # a number at the very end of the buffer may go on in the next chunk
            text, self.pos = self.buffer[self.pos : end], end
            return value, text

    def error_record(self, index: int, error: json.JSONDecodeError) -> RawRecord:
        line = self.line + self.buffer.count("\n", self.pos, error.pos)
        where = f"{self.path}:{line} (record {index})"
        text = self.buffer[self.pos : self.pos + 200]
        if not self.buffer[error.pos :].strip() or error.msg.startswith("Unterminated string"):  # the end was cut
            return RawRecord(where, text, problem=_cut_off())
        column = error.pos - self.buffer.rfind("\n", 0, error.pos)
        detail = f"invalid JSON ({error.msg.removesuffix(' at')}, column {column})"
        problem = RecordProblem("invalid JSON", None, detail, "fix it")
        return RawRecord(where, text, problem=problem)


def _saved_dataset_records(path: Path) -> Iterator[RawRecord]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise UserError(f"{path}: holds several splits ({', '.join(splits)}); pass one of them, e.g. {path}/train")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as error:  # a damaged save: tell which folder, not where in datasets it broke
        raise UserError(f"{path}: cannot load the saved dataset ({error.__class__.__name__}: {error})") from None
    return _rows(path, (row for batch in dataset.iter(batch_size=1000) for row in _batch_rows(batch)))


def _parquet_records(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's errors for a damaged footer vary by version
        raise UserError(f"{path}: cannot read the Parquet file ({error}); is it complete?") from None
    return _rows(path, (row for batch in parquet.iter_batches(batch_size=1000) for row in batch.to_pylist()))


def _batch_rows(batch: dict[str, list]) -> Iterator[dict]:
    names = list(batch)
    for values in zip(*(batch[name] for name in names), strict=True):
        yield dict(zip(names, values, strict=True))


def _rows(path: Path, rows: Iterator[dict]) -> Iterator[RawRecord]:
    for index, row in enumerate(rows):
        yield RawRecord(f"{path}: row {index}", json.dumps(row, ensure_ascii=False, default=str), value=row)


def _not_utf8() -> RecordProblem:
    return RecordProblem("not UTF-8", None, "not UTF-8 text", "is this a binary file? save the data as UTF-8")


def _invalid_json(error: json.JSONDecodeError, line: str) -> RecordProblem:
    if error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated string"):
        return RecordProblem("invalid JSON", None, "invalid JSON: the line ends inside the record", "is it cut off?")
    detail = f"invalid JSON ({error.msg.removesuffix(' at')}, column {error.colno})"
    return RecordProblem("invalid JSON", None, detail, "fix the line")


def _cut_off() -> RecordProblem:
    return RecordProblem("invalid JSON", None, "the file ends inside the JSON array", "it is cut off; fix or remove it")
