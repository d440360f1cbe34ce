"""Opening preference files of every container, one decoded record at a time.

`.jsonl` (one JSON value per line), `.json` (a JSON array, read element by element so a large array never sits in
memory whole; a `.json` file that does not start with `[` is read as JSON lines), either of them `.gz` or `.zst`
compressed (recognised by their magic bytes, whatever the name), `.parquet`, and a folder written by
`datasets.save_to_disk`. Every record carries where it came from (`file:line`, or `file: row N`) and its raw text,
so a bad one can be reported and written out as it was. A record that cannot be decoded is yielded with its
problem rather than raised: whether it stops the run is the caller's choice.

Hostile records cost little: a line longer than `max_record_bytes` is skipped over in chunks without being decoded,
JSON nested deeper than `MAX_NESTING` or holding an integer beyond Python's digit limit is a record problem (never a
RecursionError or ValueError), and so is a lone UTF-16 surrogate (`"\\ud800"`), which decodes but is not text that
UTF-8, Arrow or a tokenizer can hold.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dpo_cli.data.formats import RecordProblem
from dpo_cli.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
SUPPORTED = ".jsonl, .json, .parquet (optionally .gz or .zst) or a folder saved by datasets.save_to_disk"
JSON_ARRAY_CHUNK = 1 << 20
MAX_RECORD_BYTES = 16 << 20
"""Longest record read by default (callers that know `max_length` may allow more): far beyond what a pair can use."""
MAX_NESTING = 512
"""Deepest JSON nesting of a record. Real records nest a few levels (an Open Assistant tree two per turn); a fixed
bound, checked on every record, keeps the outcome from depending on how deep Python's stack happens to be."""
HEAD_CHARS = 1000
"""How much of an over-long record is kept for the skipped-records file."""


@dataclass
class RawRecord:
    where: str
    """file:line, or 'file: row N' where lines mean nothing (parquet, Arrow)."""
    text: str
    """The record as it was in the file, for the skipped-records file."""
    value: Any = None
    problem: RecordProblem | None = None


def open_records(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRecord]:
    """Every record of one file or dataset folder; file-level problems (missing, binary, ...) raise UserError."""
    path = check_readable(path)
    if path.is_dir():
        return _saved_dataset_records(path)
    head = _read_head(path)
    if head.startswith(PARQUET_MAGIC):
        return _parquet_records(path)
    if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
        return _text_records(path, _open_compressed(path, head), max_record_bytes)
    if b"\x00" in head:
        raise UserError(f"{path}: binary data, not text; pass {SUPPORTED}")
    return _text_records(path, _open(path), max_record_bytes)


def _is_json_lines_name(path: Path) -> bool:
    """A .jsonl name (also .jsonl.gz, .jsonl.zst) says one value per line, even when a line is a JSON array."""
    suffixes = [s.lower() for s in path.suffixes]
    return ".jsonl" in suffixes[-2:]


def check_readable(path: Path) -> Path:
    """The path, if it is a file or a dataset folder that can be read; else the one-line reason why not."""
    path = Path(path)
    if not _is_utf8(str(path)):  # bytes that are no UTF-8 reach Python as lone surrogates, which Arrow refuses
        shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")  # printable wherever stderr goes
        raise UserError(f"{shown}: the path is not valid UTF-8, and places in the data are kept as text; rename it")
    mode = _mode(path)
    if stat.S_ISDIR(mode):
        if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise UserError(f"{path}: is a folder but not one saved by datasets.save_to_disk; pass {SUPPORTED}")
    elif stat.S_ISREG(mode):
        _read_head(path)
    else:  # a pipe would block the run on open, and a device or socket is no data file either
        raise UserError(f"{path}: is not a regular file (a pipe, device or socket); pass {SUPPORTED}")
    return path


def _mode(path: Path) -> int:
    """The file type bits of `path` (following links), or the one-line reason it cannot be looked at."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the path") from None
    except NotADirectoryError:
        above = _file_above(path)
        raise UserError(f"{path}: {above} is a file, not a folder; check the path") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied on a folder of the path; make it readable") from None
    except OSError as error:  # a symbolic link loop, a name too long, an I/O error, ...
        raise UserError(f"{path}: cannot open ({error.strerror or error}); check the path") from None


def _file_above(path: Path) -> Path:
    """The first part of `path` that is a file (where a folder was expected)."""
    for parent in reversed(path.parents):
        if parent.is_file():
            return parent
    return path.parent


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None
    except OSError as error:
        raise UserError(f"{path}: cannot open ({error.strerror or error}); check the path") from None


def _read_head(path: Path) -> bytes:
    try:
        with _open(path) as handle:
            return handle.read(4096)
    except OSError as error:  # e.g. EIO, or EISDIR for a name that became a folder meanwhile
        raise UserError(f"{path}: cannot read ({error.strerror or error}); check the file") from None


def _open_compressed(path: Path, head: bytes) -> IO[bytes]:
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    import zstandard

    if not _zstd_frames_complete(path):  # zstandard's reader just stops at a cut end, where gzip raises
        raise UserError(f"{path}: cannot read (it ends inside a Zstandard frame); the file is damaged or incomplete")
    return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)


ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def _zstd_frames_complete(path: Path) -> bool:
    """Whether every Zstandard frame of the file is whole, told from frame and block headers alone (seeking over
    the block contents, RFC 8878 section 3.1), so checking costs a few reads per 128 KiB block."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        while handle.tell() < size:
            magic = int.from_bytes(handle.read(4), "little")
            if magic in ZSTD_SKIPPABLE:
                handle.seek(int.from_bytes(handle.read(4), "little"), io.SEEK_CUR)
            elif magic == int.from_bytes(ZSTD_MAGIC, "little"):
                descriptor = handle.read(1)[0] if handle.tell() < size else 0
                single_segment, fcs_flag = descriptor >> 5 & 1, descriptor >> 6
                header = (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
                header += (single_segment, 2, 4, 8)[fcs_flag]
                handle.seek(header, io.SEEK_CUR)
                last = False
                while not last and handle.tell() + 3 <= size:
                    block = int.from_bytes(handle.read(3), "little")
                    last, kind = bool(block & 1), block >> 1 & 3
                    handle.seek(1 if kind == 1 else block >> 3, io.SEEK_CUR)  # an RLE block holds one byte
                if not last:
                    return False
                handle.seek(4 * (descriptor >> 2 & 1), io.SEEK_CUR)  # the content checksum
            else:
                return True  # not a frame: the decompressor says what is wrong
            if handle.tell() > size:
                return False
    return True


def _text_records(path: Path, raw: IO[bytes], max_record_bytes: int) -> Iterator[RawRecord]:
    """JSON lines, or a JSON array when the name is not .jsonl and the first non-blank character is '['."""
    stream = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
    try:
        with stream:
            if not _is_json_lines_name(path) and _first_significant_byte(stream) == b"[":
                yield from _json_array_records(path, stream, max_record_bytes)
            else:
                yield from _json_line_records(path, stream, max_record_bytes)
    except _stream_errors() as error:  # a corrupt or cut-off .gz/.zst shows up while reading
        raise UserError(f"{path}: cannot read ({error}); the file is damaged or incomplete") from None


def _stream_errors() -> tuple[type[BaseException], ...]:
    # gzip: a bad header is BadGzipFile (an OSError), a cut end EOFError, a corrupt body zlib.error
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
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


def _json_line_records(path: Path, stream: io.BufferedReader, max_record_bytes: int) -> Iterator[RawRecord]:
    line_number = 0
    while raw_line := stream.readline(max_record_bytes + 1):
        line_number += 1
        where = f"{path}:{line_number}"
        if len(raw_line) > max_record_bytes and not raw_line.endswith(b"\n"):
            size = len(raw_line) + _skip_rest_of_line(stream)
            head = raw_line[: HEAD_CHARS * 4].decode("utf-8", errors="replace")[:HEAD_CHARS]
            yield RawRecord(where, head, problem=_too_long(f"{size:,} bytes", max_record_bytes))
            continue
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
            yield RawRecord(where, text, value=decode_record(text))
        except RecordProblem as problem:
            yield RawRecord(where, text, problem=problem)


def _skip_rest_of_line(stream: io.BufferedReader) -> int:
    """Read past the end of the current line in bounded chunks, never holding it whole; the bytes skipped."""
    skipped = 0
    while chunk := stream.readline(JSON_ARRAY_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def decode_record(text: str) -> Any:
    """The JSON value of one record's text, or a RecordProblem for every way a hostile text can break decoding."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise _invalid_json(error, text) from None
    except RecursionError:  # the C decoder guards its own stack; anything this deep is over MAX_NESTING anyway
        raise _too_deep() from None
    except ValueError as error:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise _too_many_digits(error) from None
    check_value(value, text)
    return value


def check_value(value: Any, text: str) -> None:
    """Refuse a decoded value nested deeper than MAX_NESTING or holding a lone surrogate; cheap for usual records,
    since a text with few brackets cannot be deep and one without a surrogate escape cannot hold one."""
    deep = text.count("[") + text.count("{") > MAX_NESTING
    surrogate = _SURROGATE_ESCAPE.search(text) is not None
    if not (deep or surrogate):
        return
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, field, depth = stack.pop()
        if isinstance(item, str):
            if surrogate and _has_lone_surrogate(item):
                raise _lone_surrogate(field)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_NESTING:
            raise _too_deep()
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if surrogate and isinstance(key, str) and _has_lone_surrogate(key):
                raise _lone_surrogate(field or None)
            if isinstance(child, dict | list) or (surrogate and isinstance(child, str)):
                name = f"{field}[{key}]" if isinstance(item, list) else (f"{field}.{key}" if field else str(key))
                stack.append((child, name, depth + 1))


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(text: str) -> bool:
    return not _is_utf8(text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_array_records(path: Path, stream: IO[bytes], max_record_bytes: int) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, decoded one by one from a sliding text buffer.

    An element cut by the end of the buffer fails to decode; then more text is read and it is tried again. A
    decoding error with no more text to read is a real one. After a real error the rest of the array cannot be
    found reliably, so reading stops there with that one problem.
    """
    reader = _ArrayReader(path, io.TextIOWrapper(stream, encoding="utf-8-sig"), max_record_bytes)
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
        except RecordProblem as problem:  # too long, too deep or too many digits: where it ends is not known
            yield RawRecord(where, reader.buffer[reader.pos : reader.pos + HEAD_CHARS], problem=problem)
            return
        try:
            check_value(value, text)
            yield RawRecord(where, text, value=value)
        except RecordProblem as problem:
            yield RawRecord(where, text, problem=problem)
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

    def __init__(self, path: Path, text: IO[str], max_record_chars: int):
        self.path, self.text, self.max_record_chars = path, text, max_record_chars
        self.buffer, self.pos, self.line, self.at_eof = "", 0, 1, False
        self.decoder = json.JSONDecoder()

    def fill(self) -> bool:
        """Read more: as much again as the unread part holds, so a long record is decoded a few times, not once a
        chunk (which would make reading it quadratic)."""
        try:
            chunk = self.text.read(max(JSON_ARRAY_CHUNK, len(self.buffer) - self.pos))
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
                if len(self.buffer) - self.pos > self.max_record_chars:
                    raise _too_long("longer", self.max_record_chars) from None
                if self.at_eof or not self.fill():
                    raise
                continue
            except RecursionError:
                raise _too_deep() from None
            except ValueError as error:
                raise _too_many_digits(error) from None
            if end - self.pos > self.max_record_chars:
                raise _too_long(f"{end - self.pos:,} characters", self.max_record_chars)
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
    index = 0
    try:
        for index, row in enumerate(rows):  # noqa: B007 (the index is the place of a damaged row)
            yield RawRecord(f"{path}: row {index}", json.dumps(row, ensure_ascii=False, default=str), value=row)
    except (OSError, ValueError) as error:  # pyarrow's errors for a damaged body (ArrowInvalid is a ValueError)
        raise UserError(f"{path}: row {index}: cannot read ({error}); the file is damaged or incomplete") from None


def _not_utf8() -> RecordProblem:
    return RecordProblem("not UTF-8", None, "not UTF-8 text", "is this a binary file? save the data as UTF-8")


def _invalid_json(error: json.JSONDecodeError, line: str) -> RecordProblem:
    if error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated string"):
        return RecordProblem("invalid JSON", None, "invalid JSON: the line ends inside the record", "is it cut off?")
    detail = f"invalid JSON ({error.msg.removesuffix(' at')}, column {error.colno})"
    return RecordProblem("invalid JSON", None, detail, "fix the line")


def _too_long(size: str, limit: int) -> RecordProblem:
    detail = (
        f"the record is {size} than the limit of {limit:,} bytes"
        if size == "longer"
        else (f"the record is {size} long, over the limit of {limit:,} bytes")
    )
    return RecordProblem("record too long", None, detail, "no pair can use that much text; shorten or remove it")


def _too_deep() -> RecordProblem:
    detail = f"the record nests lists or objects more than {MAX_NESTING} levels deep"
    return RecordProblem("nested too deep", None, detail, "no format nests that deep; fix or remove it")


def _too_many_digits(error: ValueError) -> RecordProblem:
    if "integer string conversion" not in str(error):
        raise error  # not a number too long: a bug to see in full
    detail = f"holds an integer of more than {sys.get_int_max_str_digits():,} digits, more than Python reads"
    return RecordProblem("invalid JSON", None, detail, "write it as a string or remove it")


def _lone_surrogate(field: str | None) -> RecordProblem:
    detail = "holds a lone UTF-16 surrogate escape (such as \\ud800), which is no character and cannot be encoded"
    return RecordProblem("lone surrogate", field, detail, "fix the escape (half of an emoji?) or remove the record")


def _cut_off() -> RecordProblem:
    return RecordProblem("invalid JSON", None, "the file ends inside the JSON array", "it is cut off; fix or remove it")
