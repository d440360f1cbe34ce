"""JSON lines and JSON arrays read from a byte stream, one record at a time, long and broken ones bounded.

`.jsonl` is one JSON value per line; `.json` is a JSON array, read element by element so a large array never sits
in memory whole (a `.json` file that does not start with `[` is read as JSON lines). A line longer than
`max_record_bytes` is skipped over in chunks without being decoded.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dpo_cli.data.decode import (
    HEAD_CHARS,
    SUPPORTED,
    RawRecord,
    check_value,
    cut_off,
    decode_record,
    not_utf8,
    too_deep,
    too_long,
    too_many_digits,
)
from dpo_cli.data.formats import RecordProblem
from dpo_cli.errors import UserError

JSON_ARRAY_CHUNK = 1 << 20
TOKEN_CHARS = 64
"""More than any number or literal a record holds is long: an error this far before the end of the text read is
not a token cut by the end of the buffer (a string cut there says so: 'Unterminated string')."""


def text_records(path: Path, raw: IO[bytes], max_record_bytes: int) -> Iterator[RawRecord]:
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


def _is_json_lines_name(path: Path) -> bool:
    """A .jsonl name (also .jsonl.gz, .jsonl.zst) says one value per line, even when a line is a JSON array."""
    suffixes = [s.lower() for s in path.suffixes]
    return ".jsonl" in suffixes[-2:]


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
            yield RawRecord(where, head, problem=too_long(f"{size:,} bytes", max_record_bytes))
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            text = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
            yield RawRecord(where, text, problem=not_utf8())
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


def _json_array_records(path: Path, stream: IO[bytes], max_record_bytes: int) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, decoded one by one from a sliding text buffer.

    An element cut by the end of the buffer fails to decode; then more text is read and it is tried again. A
    decoding error with no more text to read is a real one. After a real error (or a record too deep, or with a
    number too long) reading goes on after the next ',' outside strings and brackets, where the syntax lets it be
    found within a record's length; where it does not, a last problem says the rest of the array was not read.
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
            yield RawRecord(where, "", problem=cut_off())
            return
        try:
            value, text = reader.decode()
        except json.JSONDecodeError as error:
            yield reader.error_record(index, error)
            if reader.is_cut_off(error):
                return
            boundary = reader.skip_element()
        except RecordProblem as problem:  # too long, too deep or too many digits
            yield RawRecord(where, reader.buffer[reader.pos : reader.pos + HEAD_CHARS], problem=problem)
            boundary = reader.skip_element() if problem.reason != "record too long" else ""
        else:
            boundary = None
        if boundary is not None:  # after a record that could not be decoded
            if boundary == "]":
                return
            if boundary == "":
                yield RawRecord(f"{path}:{reader.line} (after record {index})", "", problem=_rest_not_read())
                return
            index += 1
            continue
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


def _rest_not_read() -> RecordProblem:
    detail = "the rest of the JSON array cannot be read: no record boundary (',') follows the broken record"
    return RecordProblem("invalid JSON", None, detail, "fix that record; the records after it were not read")


_STRUCTURE = re.compile(r'["\[\]{},]')
_STRING_REST = re.compile(r'(?:[^"\\\n]|\\.)*"')  # from after an opening quote to the closing one, on one line


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
            except json.JSONDecodeError as error:
                if error.pos + TOKEN_CHARS < len(self.buffer) and not error.msg.startswith("Unterminated string"):
                    raise  # what follows the error is read already: more text cannot mend it
                if len(self.buffer) - self.pos > self.max_record_chars:
                    raise too_long("longer", self.max_record_chars) from None
                if self.at_eof or not self.fill():
                    raise
                continue
            except RecursionError:
                raise too_deep() from None
            except ValueError as error:
                raise too_many_digits(error) from None
            if end - self.pos > self.max_record_chars:
                raise too_long(f"{end - self.pos:,} characters", self.max_record_chars)
            if end == len(self.buffer) and not self.at_eof and self.fill():
                continue  # a number at the very end of the buffer may go on in the next chunk
            text, self.pos = self.buffer[self.pos : end], end
            return value, text

    def skip_element(self) -> str:
        """Move past the element at `pos`, which failed to decode, to the boundary after it: ',' (the position is
        then after it), ']' (the array ends) or '' when no boundary is found within a record's length.

        Brackets are counted outside strings; a string ends at its closing quote or, being broken, at the end of
        its line (JSON strings hold no raw line breaks), so one bad quote does not swallow the records after it.
        """
        while len(self.buffer) - self.pos <= self.max_record_chars and not self.at_eof and self.fill():
            pass
        start, end = self.pos, min(len(self.buffer), self.pos + self.max_record_chars)
        depth, at = 0, start
        while match := _STRUCTURE.search(self.buffer, at, end):
            found, at = match.group(), match.end()
            if found == '"':
                string = _STRING_REST.match(self.buffer, at, end)
                line_end = self.buffer.find("\n", at, end)
                at = string.end() if string else (line_end if line_end >= 0 else end)
            elif found in "[{":
                depth += 1
            elif depth > 0 and found in "]}":
                depth -= 1
            elif depth == 0 and found in ",]":
                self.line += self.buffer.count("\n", start, at)
                self.pos = at if found == "," else at - 1
                return found
        return ""

    def is_cut_off(self, error: json.JSONDecodeError) -> bool:
        """Whether a decoding error at the end of the file is the file ending inside the record."""
        return not self.buffer[error.pos :].strip() or error.msg.startswith("Unterminated string")

    def error_record(self, index: int, error: json.JSONDecodeError) -> RawRecord:
        line = self.line + self.buffer.count("\n", self.pos, error.pos)
        where = f"{self.path}:{line} (record {index})"
        text = self.buffer[self.pos : self.pos + 200]
        if self.is_cut_off(error):
            return RawRecord(where, text, problem=cut_off())
        column = error.pos - self.buffer.rfind("\n", 0, error.pos)
        detail = f"invalid JSON ({error.msg.removesuffix(' at')}, column {column})"
        problem = RecordProblem("invalid JSON", None, detail, "fix it")
        return RawRecord(where, text, problem=problem)
