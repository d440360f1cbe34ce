"""A record as read, and the decoding of its JSON text with hostile input bounded.

Every record carries where it came from (`file:line`, or `file: row N`) and its raw text, so a bad one can be
reported and written out as it was; a record that cannot be decoded carries its problem rather than raising it.
JSON nested deeper than `MAX_NESTING` or holding an integer beyond Python's digit limit is a record problem (never a
RecursionError or ValueError), and so is a lone UTF-16 surrogate (`"\\ud800"`), which decodes but is not text that
UTF-8, Arrow or a tokenizer can hold. The problems every reader can meet are built here, so they read the same.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from dpo_cli.data.formats import RecordProblem

SUPPORTED = ".jsonl, .json, .parquet (optionally .gz or .zst) or a folder saved by datasets.save_to_disk"
"""What the readers read, for the messages that say what to pass instead."""

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


def decode_record(text: str) -> Any:
    """The JSON value of one record's text, or a RecordProblem for every way a hostile text can break decoding."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid_json(error, text) from None
    except RecursionError:  # the C decoder guards its own stack; anything this deep is over MAX_NESTING anyway
        raise too_deep() from None
    except ValueError as error:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise too_many_digits(error) from None
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
                raise lone_surrogate(field)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_NESTING:
            raise too_deep()
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if surrogate and isinstance(key, str) and _has_lone_surrogate(key):
                raise lone_surrogate(field or None)
            if isinstance(child, dict | list) or (surrogate and isinstance(child, str)):
                name = f"{field}[{key}]" if isinstance(item, list) else (f"{field}.{key}" if field else str(key))
                stack.append((child, name, depth + 1))


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(text: str) -> bool:
    return not is_utf8(text)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_utf8() -> RecordProblem:
    return RecordProblem("not UTF-8", None, "not UTF-8 text", "is this a binary file? save the data as UTF-8")


def invalid_json(error: json.JSONDecodeError, line: str) -> RecordProblem:
    if error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated string"):
        return RecordProblem("invalid JSON", None, "invalid JSON: the line ends inside the record", "is it cut off?")
    detail = f"invalid JSON ({error.msg.removesuffix(' at')}, column {error.colno})"
    return RecordProblem("invalid JSON", None, detail, "fix the line")


def too_long(size: str, limit: int) -> RecordProblem:
    detail = (
        f"the record is {size} than the limit of {limit:,} bytes"
        if size == "longer"
        else (f"the record is {size} long, over the limit of {limit:,} bytes")
    )
    return RecordProblem("record too long", None, detail, "no pair can use that much text; shorten or remove it")


def too_deep() -> RecordProblem:
    detail = f"the record nests lists or objects more than {MAX_NESTING} levels deep"
    return RecordProblem("nested too deep", None, detail, "no format nests that deep; fix or remove it")


def too_many_digits(error: ValueError) -> RecordProblem:
    if "integer string conversion" not in str(error):
        raise error  # not a number too long: a bug to see in full
    detail = f"holds an integer of more than {sys.get_int_max_str_digits():,} digits, more than Python reads"
    return RecordProblem("invalid JSON", None, detail, "write it as a string or remove it")


def lone_surrogate(field: str | None) -> RecordProblem:
    detail = "holds a lone UTF-16 surrogate escape (such as \\ud800), which is no character and cannot be encoded"
    return RecordProblem("lone surrogate", field, detail, "fix the escape (half of an emoji?) or remove the record")


def cut_off() -> RecordProblem:
    return RecordProblem("invalid JSON", None, "the file ends inside the JSON array", "it is cut off; fix or remove it")
