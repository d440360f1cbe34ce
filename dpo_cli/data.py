"""Reading and checking preference files.

Each record becomes a `PreferencePair` (prompt, chosen, rejected) that remembers where it came from, so every
problem can be reported as `file:line: field: what is wrong; what to do`. Bad input is normal input: nothing here
raises anything but `UserError` for a problem in the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dpo_cli.errors import UserError

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: str
    """Where the record came from, as `file:line`, for error messages."""


def _open_text(path: Path):
    if not path.exists():
        raise UserError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a .jsonl file of preference pairs")
    try:
        return path.open("r", encoding="utf-8")
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None


def check_record(record: object, where: str) -> PreferencePair:
    """Validate one decoded JSON record of the explicit format."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with prompt, chosen, rejected; got {type(record).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise UserError(f"{where}: field '{name}' is missing; every record needs prompt, chosen and rejected")
        value = record[name]
        if not isinstance(value, str):
            raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if name != "prompt" and not value.strip():
            raise UserError(f"{where}: field '{name}' is empty; remove the record or fill it in")
    if not record["prompt"].strip():
        raise UserError(f"{where}: field 'prompt' is empty; remove the record or fill it in")
    if record["chosen"] == record["rejected"]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical, so the pair teaches nothing; remove it")
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], where)


def read_jsonl(path: Path) -> Iterator[PreferencePair]:
    """Yield the pairs of a `{"prompt","chosen","rejected"}` JSONL file; blank lines are skipped."""
    path = Path(path)
    with _open_text(path) as handle:
        line_number = 0
        try:
            for line_number, line in enumerate(handle, start=1):  # noqa: B007 (used after the loop on errors)
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(
                        f"{where}: invalid JSON ({error.msg} at column {error.colno}); fix the line"
                    ) from None
                yield check_record(record, where)
        except UnicodeDecodeError:
            raise UserError(f"{path}:{line_number + 1}: not UTF-8 text; is this a binary file?") from None


def read_pairs(paths: list[str]) -> list[PreferencePair]:
    """All pairs of all files, in order; an empty result is an error, since there is nothing to learn from."""
    if not paths:
        raise UserError("no training data: pass --data FILE.jsonl or set data.train in the recipe")
    pairs: list[PreferencePair] = []
    for path in paths:
        before = len(pairs)
        pairs.extend(read_jsonl(Path(path)))
        if len(pairs) == before:
            raise UserError(f"{path}: no preference pairs in the file; it is empty")
    return pairs
