"""Broken preference files: each stops `dpo-cli train` with one clear line and exit code 2, never a traceback;
`--on-invalid skip` sets bad records aside, counts them per reason and writes them out as they were."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from tests.conftest import run_cli_inprocess, run_cli_subprocess

GOOD = json.dumps({"prompt": "Once upon a time", "chosen": " a happy cat smiled", "rejected": " a sad cat cried"})
SKIP_HINT = " (or pass --on-invalid skip to set bad records aside)"
ASSISTANT_X, ASSISTANT_Y = ({"role": "assistant", "content": text} for text in ("x", "y"))
LATIN1 = '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")


def _lines(*records: str) -> str:
    return "".join(record + "\n" for record in records)


# name -> (file content, the expected error after "error: {path}")
BROKEN_TEXT = {
    "truncated.jsonl": (
        _lines(GOOD, '{"prompt": "a", "chosen": "b", "rej'),
        ":2: invalid JSON: the line ends inside the record; is it cut off?" + SKIP_HINT,
    ),
    "bad_syntax.jsonl": (
        _lines(GOOD, '{"prompt": "a" "chosen": "b"}'),
        ":2: invalid JSON (Expecting ',' delimiter, column 16); fix the line" + SKIP_HINT,
    ),
    "truncated.json": (
        "[\n" + GOOD + ",\n" + GOOD[:30],
        ":3 (record 1): the file ends inside the JSON array; it is cut off; fix or remove it" + SKIP_HINT,
    ),
    "wrong_type.jsonl": (
        _lines(GOOD, json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"})),
        ":2: field 'chosen': must be a string, got int; fix the record or pass --format NAME" + SKIP_HINT,
    ),
    "missing_field.jsonl": (
        _lines(json.dumps({"prompt": "a", "chosen": "b"})),
        ":1: field 'rejected': is missing; every record needs prompt, chosen and rejected strings" + SKIP_HINT,
    ),
    "empty_string.jsonl": (
        _lines(GOOD, GOOD, json.dumps({"prompt": "a", "chosen": "  ", "rejected": "c"})),
        ":3: field 'chosen': is empty; fill it in or remove the record" + SKIP_HINT,
    ),
    "identical.jsonl": (
        _lines(GOOD, json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"})),
        ":2: field 'chosen': is identical to 'rejected', so the pair teaches nothing; remove it" + SKIP_HINT,
    ),
    "not_an_object.jsonl": (
        _lines("[1, 2]"),
        ":1: expected a JSON object, got a list; one record per line" + SKIP_HINT,
    ),
    "bad_message.jsonl": (
        _lines(json.dumps({"prompt": [{"role": "user"}], "chosen": [ASSISTANT_X], "rejected": [ASSISTANT_Y]})),
        ":1: field 'prompt[0].content': is missing; every record needs role and content in every message" + SKIP_HINT,
    ),
    "hh_no_assistant.jsonl": (
        _lines(json.dumps({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hello"})),
        ":1: field 'chosen': shares no '\\n\\nAssistant:' turn with 'rejected', so the prompt cannot be found; "
        "add a 'prompt' field (explicit format) or fix the dialogue" + SKIP_HINT,
    ),
    "unknown_keys.jsonl": (
        _lines(json.dumps({"question_text": "a", "answer": "b"})),
        ":1: cannot tell the data format from the keys (answer, question_text); pass --format (explicit, hh-rlhf, "
        "conversational, openai, sharegpt, oasst, stack-exchange) or map names with --columns "
        "prompt=...,chosen=...,rejected=...",
    ),
    "empty.jsonl": ("", ": no records; the file is empty"),
}


def _write_broken(tmp_path, name: str):
    path = tmp_path / name
    if name in BROKEN_TEXT:
        path.write_text(BROKEN_TEXT[name][0], encoding="utf-8")
    elif name == "garbage.bin":
        path.write_bytes(os.urandom(2000) + b"\x00" * 16)
    elif name == "latin1.jsonl":
        path.write_bytes(
            (GOOD + "\n").encode() + '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
        )
    elif name == "damaged.jsonl.gz":
        path.write_bytes(gzip.compress((GOOD + "\n").encode() * 200)[:-30])
    elif name == "a_folder":
        path.mkdir()
    return path


OTHER_BROKEN = {
    "garbage.bin": ": binary data, not text; pass .jsonl, .json, .parquet (optionally .gz or .zst) or a folder saved "
    "by datasets.save_to_disk",
    "latin1.jsonl": ":2: not UTF-8 text; is this a binary file? save the data as UTF-8" + SKIP_HINT,
    "damaged.jsonl.gz": ": cannot read (Compressed file ended before the end-of-stream marker was reached); the file "
    "is damaged or incomplete",
    "a_folder": ": is a folder but not one saved by datasets.save_to_disk; pass .jsonl, .json, .parquet (optionally "
    ".gz or .zst) or a folder saved by datasets.save_to_disk",
    "missing.jsonl": ": file not found; check the path",
}
EXPECTED = {name: expected for name, (_, expected) in BROKEN_TEXT.items()} | OTHER_BROKEN


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_broken_file_stops_train_with_its_one_line(name, tmp_path, capsys, train_args):
    path = _write_broken(tmp_path, name)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path))
    assert code == 2
    assert stderr == f"error: {path}{EXPECTED[name]}\n"
    assert not (tmp_path / "run" / "adapter_config.json").exists()


@pytest.mark.parametrize("name", ["truncated.jsonl", "garbage.bin", "missing.jsonl"])
def test_broken_files_in_a_real_process_give_no_traceback(name, tmp_path, train_args):
    path = _write_broken(tmp_path, name)
    result = run_cli_subprocess(*train_args(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}{EXPECTED[name]}"]


def test_skip_counts_each_reason_and_writes_the_skipped_lines_as_they_were(tmp_path, capsys, untrained_tiny):
    from rich.console import Console

    from dpo_cli.config import DataSection
    from dpo_cli.data.split import SplitRequest
    from dpo_cli.model.load import load_tokenizer
    from dpo_cli.run.data_report import load_split

    bad_json = '{"prompt": "a", "chosen": "b", "rej'
    identical = json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"})
    wrong_type = json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"})
    path = tmp_path / "mixed.jsonl"
    path.write_text(_lines(GOOD, bad_json, GOOD, identical, GOOD, bad_json, wrong_type, GOOD), encoding="utf-8")
    tokenizer = load_tokenizer(str(untrained_tiny["model"]))
    console = Console(width=10_000)
    out = tmp_path / "run"
    request = SplitRequest([str(path)], "train", DataSection(on_invalid="skip", max_length=64), out)
    pairs, summary = load_split(tokenizer, request, console)  # as train and eval load and report a split
    printed = capsys.readouterr().out
    assert len(pairs) == summary.kept == 4
    assert (
        f"train data: skipped 4: 2 invalid JSON (first: {path}:2, {path}:6), 1 chosen equals rejected (first: "
        f"{path}:4), 1 wrong type (first: {path}:7); they are in {out / 'skipped-train.jsonl'}"
    ) in printed
    written = [json.loads(line) for line in (out / "skipped-train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["source"] for row in written] == [f"{path}:{n}" for n in (2, 4, 6, 7)]
    assert [row["record"] for row in written] == [bad_json, identical, bad_json, wrong_type]
    assert written[1]["reason"] == "chosen equals rejected"
    assert written[1]["message"].startswith(f"{path}:4: field 'chosen': is identical to 'rejected'")
    assert "train data: 3 pairs repeat an earlier pair exactly" in printed


def test_skip_sets_aside_pairs_whose_prompt_fills_max_length(tmp_path, capsys, train_args):
    long_prompt = json.dumps({"prompt": "Once upon a time " * 20, "chosen": " yes", "rejected": " no"})
    path = tmp_path / "long.jsonl"
    path.write_text(_lines(GOOD, long_prompt, GOOD), encoding="utf-8")
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path, "--max-length", 32))
    assert code == 2
    assert stderr.startswith(f"error: {path}:2: field 'prompt': is ")
    assert "tokens, which fills max_length=32 and leaves no room for a completion; raise --max-length" in stderr
    skip = train_args(path, "--max-length", 32, "--on-invalid", "skip", "--batch-size", 2)
    code, stdout, stderr = run_cli_inprocess(capsys, *skip)
    assert code == 0, stderr
    assert f"skipped 1: 1 prompt fills max_length (first: {path}:2)" in " ".join(stdout.split())
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "skipped-train.jsonl").read_text().splitlines()]
    assert json.loads(row["record"]) == json.loads(long_prompt)
    assert "dropped (prompt fills max_length): 1" in (tmp_path / "run" / "train_summary.txt").read_text()


def test_all_records_invalid_under_skip_is_an_error_after_the_summary(tmp_path, capsys, train_args):
    path = tmp_path / "all_bad.jsonl"
    path.write_text(_lines('{"prompt": 1}', "[]"), encoding="utf-8")
    code, stdout, stderr = run_cli_inprocess(capsys, *train_args(path, "--on-invalid", "skip"))
    assert code == 2
    assert "skipped 2" in stdout
    assert stderr == "error: train data: no pair is left to use; 2 records or pairs were skipped\n"


def test_bad_data_settings_are_named(tmp_path, capsys, train_args):
    path = tmp_path / "ok.jsonl"
    path.write_text(_lines(GOOD, GOOD), encoding="utf-8")
    cases = {
        ("--format", "csv"): "error: recipe key data.format: 'csv' is not one of auto, explicit, hh-rlhf, "
        "conversational, openai, sharegpt, oasst, stack-exchange, prompt-completion, messages, text\n",
        ("--on-invalid", "ignore"): "error: recipe key data.on_invalid: 'ignore' is not one of error, skip\n",
        ("--columns", "prompt"): "error: --columns 'prompt': 'prompt' is not FIELD=COLUMN with FIELD one of prompt, "
        "chosen, rejected, completion, messages, text; e.g. --columns "
        "prompt=question,chosen=response_j,rejected=response_k\n",
        ("--columns", "prompt=question"): f"error: {path}:1: field 'question': is missing; every record needs the "
        f"column 'question' (mapped to prompt by --columns){SKIP_HINT}\n",
        ("--chat-template", tmp_path / "none.jinja"): f"error: {tmp_path / 'none.jinja'}: chat template file not "
        "found; pass a Jinja template file, a built-in name or tokenizer with --chat-template\n",
    }
    for flags, expected in cases.items():
        code, _, stderr = run_cli_inprocess(capsys, *train_args(path, *flags))
        assert (code, stderr) == (2, expected)
