"""A `.json` array with a record that cannot be decoded: reading goes on at the next record where the syntax lets
the boundary be found, and says so where it cannot (on main it stopped at the first such record, silently
dropping the rest under --on-invalid skip)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dpo_cli.data.json_text import text_records
from tests.conftest import run_cli_inprocess

GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


def _read(text: str, max_record_bytes: int = 10**6) -> list[tuple[str, str]]:
    records = text_records(Path("a.json"), io.BytesIO(text.encode()), max_record_bytes)
    return [(r.where, r.problem.detail if r.problem else "ok") for r in records]


def _array(*records: str) -> str:
    return "[\n" + ",\n".join(records) + "\n]\n"


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        ('{"prompt": "a" "chosen": "b"}', "invalid JSON (Expecting ',' delimiter, column 16)"),
        ('{"prompt": tru, "x": [1, {"y": "]},"}]}', "invalid JSON (Expecting value, column 12)"),
        ("[" * 100_000 + "]" * 100_000, "the record nests lists or objects more than 512 levels deep"),
        ('{"n": ' + "1" * 5000 + "}", "holds an integer of more than 4,300 digits, more than Python reads"),
    ],
    ids=["syntax", "brackets-and-commas-in-strings", "deep", "digits"],
)
def test_reading_goes_on_after_a_record_that_cannot_be_decoded(bad, detail):
    assert _read(_array(GOOD, bad, GOOD, GOOD)) == [
        ("a.json:2 (record 0)", "ok"),
        ("a.json:3 (record 1)", detail),
        ("a.json:4 (record 2)", "ok"),
        ("a.json:5 (record 3)", "ok"),
    ]


def test_a_broken_last_record_ends_the_array():
    assert _read(_array(GOOD, '{"prompt": tru}')) == [
        ("a.json:2 (record 0)", "ok"),
        ("a.json:3 (record 1)", "invalid JSON (Expecting value, column 12)"),
    ]


def test_where_no_boundary_can_be_found_the_rest_is_said_not_to_be_read():
    """Mismatched brackets: where the record ends cannot be told, so what follows is not guessed at."""
    read = _read(_array(GOOD, '{"prompt": [1, 2}', GOOD, GOOD))
    assert read[:2] == [("a.json:2 (record 0)", "ok"), ("a.json:3 (record 1)", read[1][1])]
    assert read[2][0] == "a.json:3 (after record 1)" and len(read) == 3
    assert read[2][1].startswith("the rest of the JSON array cannot be read")


def test_a_syntax_error_in_a_large_array_is_found_without_reading_on_to_the_limit():
    """The error is followed by text already read, so more text cannot mend it: it is not a 'record too long'."""
    records = [GOOD] * 20_000 + ['{"prompt": "a" "chosen": "b"}'] + [GOOD] * 20_000  # 2 MB, limit 10 kB
    read = _read(_array(*records), max_record_bytes=10_000)
    assert len(read) == 40_001 and [r for r in read if r[1] != "ok"] == [
        ("a.json:20002 (record 20000)", "invalid JSON (Expecting ',' delimiter, column 16)")
    ]


def test_data_check_counts_the_broken_record_and_the_rest(tmp_path, capsys):
    path = tmp_path / "pairs.json"
    path.write_text(_array(GOOD, '{"prompt": "a" "chosen": "b"}', GOOD, '{"prompt": tru}', GOOD))
    code, stdout, stderr = run_cli_inprocess(capsys, "data", "check", path, "--json")
    report = json.loads(stdout)
    file = report["files"][0]
    assert code == 1 and file["records"] == 5 and file["pairs"] == 3, (stdout, stderr)
    assert file["invalid"]["invalid JSON"]["count"] == 2
