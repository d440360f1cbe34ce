"""Hostile data files and a damaged or unwritable data cache: each ends in one line and exit 2 for `train`, `eval`
and `data check` (a bad record is set aside and counted under `--on-invalid skip`), with no traceback, nothing
written outside the output folder, and a hostile line costing little. Every file is generated in tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dpo_cli.config import DataSection
from dpo_cli.data.cache import lock_path
from dpo_cli.data.decode import MAX_NESTING, MAX_RECORD_BYTES
from dpo_cli.data.records import read_json_lines
from tests.conftest import run_cli_inprocess, run_cli_subprocess, train_adapter

GOOD = json.dumps({"prompt": "Once upon a time", "chosen": " a happy cat smiled", "rejected": " a sad cat cried"})
OTHER = json.dumps({"prompt": "The dog", "chosen": " ran home", "rejected": " sat still"})
SKIP_HINT = " (or pass --on-invalid skip to set bad records aside)"
DEEP = "[" * 100_000 + "]" * 100_000
LONG_RECORD = '{"prompt": "' + "a" * MAX_RECORD_BYTES + '", "chosen": " yes", "rejected": " no"}'
CACHE_HINT = "set data.cache_dir in the recipe or $DPO_CLI_CACHE to a writable folder"


def _lines(*records: str) -> str:
    return "".join(record + "\n" for record in records)


def _record(prompt: str) -> str:
    """A record whose prompt is `prompt` as raw JSON text (so it can be hostile)."""
    return '{"prompt": ' + prompt + ', "chosen": " yes", "rejected": " no"}'


# name -> (file text, the line `train` stops with after "error: {path}", the reason `--on-invalid skip` counts)
HOSTILE_RECORDS = {
    "deep.jsonl": (
        _lines(GOOD, _record(DEEP), OTHER),
        f":2: the record nests lists or objects more than {MAX_NESTING} levels deep; no format nests that deep; fix "
        "or remove it",
        "nested too deep",
    ),
    "deep.json": (
        "[" + ",\n".join([GOOD, OTHER, _record(DEEP)]) + "]",
        f":3 (record 2): the record nests lists or objects more than {MAX_NESTING} levels deep; no format nests that "
        "deep; fix or remove it",
        "nested too deep",
    ),
    "deep_but_decodable.jsonl": (  # under the recursion limit, over MAX_NESTING: refused just the same
        _lines(GOOD, _record("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)), OTHER),
        f":2: the record nests lists or objects more than {MAX_NESTING} levels deep; no format nests that deep; fix "
        "or remove it",
        "nested too deep",
    ),
    "surrogate.jsonl": (
        _lines(GOOD, _record('"a\\ud800b"'), OTHER),
        ":2: field 'prompt': holds a lone UTF-16 surrogate escape (such as \\ud800), which is no character and cannot "
        "be encoded; fix the escape (half of an emoji?) or remove the record",
        "lone surrogate",
    ),
    "surrogate_in_message.jsonl": (
        _lines(
            GOOD,
            '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": '
            '"x"}], "rejected": [{"role": "assistant", "content": "\\udfff"}]}',
            OTHER,
        ),
        ":2: field 'rejected[0].content': holds a lone UTF-16 surrogate escape (such as \\ud800), which is no "
        "character and cannot be encoded; fix the escape (half of an emoji?) or remove the record",
        "lone surrogate",
    ),  # fmt: skip
    "big_integer.jsonl": (
        _lines(GOOD, '{"prompt": "p", "chosen": "a", "rejected": "b", "id": ' + "9" * 5000 + "}", OTHER),
        ":2: holds an integer of more than 4,300 digits, more than Python reads; write it as a string or remove it",
        "invalid JSON",
    ),
    "long_line.jsonl": (
        _lines(GOOD, LONG_RECORD, OTHER),
        f":2: the record is {len(LONG_RECORD) + 1:,} bytes long, over the limit of {MAX_RECORD_BYTES:,} bytes; no pair "
        "can use that much text; shorten or remove it",
        "record too long",
    ),
}


def _hostile(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(HOSTILE_RECORDS[name][0], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter(untrained_tiny, tmp_path_factory) -> Path:
    """An adapter trained one step on the untrained tiny model: enough for `eval` to get to its data."""
    out = tmp_path_factory.mktemp("hostile-adapter") / "run"
    return train_adapter(out, untrained_tiny["model"], untrained_tiny["train"], 1, "--batch-size", "4")


def _files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


# Hostile records ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_RECORDS))
def test_a_hostile_record_stops_train_with_its_one_line(name, tmp_path, capsys, train_args):
    path = _hostile(tmp_path, name)
    before = _files_under(tmp_path)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path))
    assert (code, stderr) == (2, f"error: {path}{HOSTILE_RECORDS[name][1]}{SKIP_HINT}\n")
    assert _files_under(tmp_path) == before  # no output folder, nothing beside it


@pytest.mark.parametrize("name", sorted(HOSTILE_RECORDS))
def test_data_check_counts_a_hostile_record_and_keeps_the_rest(name, tmp_path, capsys, untrained_tiny):
    path = _hostile(tmp_path, name)
    code, stdout, stderr = run_cli_inprocess(
        capsys, "data", "check", path, "--model", untrained_tiny["model"], "--json"
    )
    assert code == 1, stderr  # 1: the check ran and found invalid records
    total = json.loads(stdout)["total"]
    assert (total["records"], total["pairs"]) == (3, 2)
    ((reason, entry),) = total["invalid"].items()
    assert (reason, entry["count"]) == (HOSTILE_RECORDS[name][2], 1)
    assert entry["message"] == f"{path}{HOSTILE_RECORDS[name][1]}"


def test_train_with_skip_sets_a_deep_record_aside_and_trains_on_the_rest(tmp_path, capsys, train_args):
    path = _hostile(tmp_path, "deep.jsonl")
    code, stdout, stderr = run_cli_inprocess(capsys, *train_args(path, "--on-invalid", "skip", "--batch-size", 2))
    assert code == 0, stderr
    assert f"skipped 1: 1 nested too deep (first: {path}:2)" in " ".join(stdout.split())
    (row,) = [json.loads(line) for line in read_json_lines(tmp_path / "run" / "skipped-train.jsonl")]
    assert row["record"] == _record(DEEP)


def test_eval_stops_on_a_hostile_record_or_skips_it(adapter, tmp_path, capsys):
    path = _hostile(tmp_path, "surrogate.jsonl")
    code, _, stderr = run_cli_inprocess(capsys, "eval", "--adapter", adapter, "--data", path)
    assert (code, stderr) == (2, f"error: {path}{HOSTILE_RECORDS['surrogate.jsonl'][1]}{SKIP_HINT}\n")
    output = tmp_path / "out" / "eval.json"
    flags = ["--output", output, "--on-invalid", "skip"]
    code, _, stderr = run_cli_inprocess(capsys, "eval", "--adapter", adapter, "--data", path, *flags)
    assert code == 0, stderr
    assert json.loads(output.read_text())["metrics"]["num_pairs"] == 2
    (row,) = [json.loads(line) for line in read_json_lines(tmp_path / "out" / "skipped-eval.jsonl")]
    assert row["reason"] == "lone surrogate" and row["record"] == _record('"a\\ud800b"')


def test_a_hostile_record_in_a_real_process_gives_no_traceback(tmp_path, train_args):
    path = _hostile(tmp_path, "deep.json")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli_subprocess(*train_args(path), cwd=cwd)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path}{HOSTILE_RECORDS['deep.json'][1]}{SKIP_HINT}"]
    assert not any(cwd.iterdir()) and not (tmp_path / "run").exists()


# Damaged compressed files and paths that are no data file: exit 2 even under skip ------------------------------------


def _gzip_with_corrupt_body(path: Path) -> None:
    packed = bytearray(gzip.compress(_lines(GOOD, OTHER).encode() * 200))
    for i in range(20, len(packed) - 20):  # the 10-byte header stays valid, the deflate stream does not
        packed[i] ^= 0x55
    path.write_bytes(bytes(packed))


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _zstd_with_corrupt_body(path: Path) -> None:
    packed = bytearray(_zstd(_lines(GOOD, OTHER).encode() * 200))
    for i in range(12, len(packed)):
        packed[i] ^= 0x55
    path.write_bytes(bytes(packed))


DAMAGED = {
    "corrupt.jsonl.gz": (_gzip_with_corrupt_body, ": cannot read (Error -3 while decompressing data: "),
    "truncated.json.gz": (
        lambda path: path.write_bytes(gzip.compress(("[" + GOOD + "," + OTHER + "]").encode() * 1)[:-12]),
        ": cannot read (Compressed file ended before the end-of-stream marker was reached)",
    ),
    "corrupt.jsonl.zst": (_zstd_with_corrupt_body, ": cannot read ("),
    "truncated.jsonl.zst": (
        lambda path: path.write_bytes(_zstd(_lines(GOOD, OTHER).encode() * 200)[:-20]),
        ": cannot read (it ends inside a Zstandard frame)",
    ),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
@pytest.mark.parametrize("on_invalid", ["error", "skip"])
def test_a_damaged_compressed_file_is_one_line(name, on_invalid, tmp_path, capsys, train_args):
    write, start = DAMAGED[name]
    path = tmp_path / name
    write(path)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path, "--on-invalid", on_invalid))
    assert code == 2
    assert stderr.startswith(f"error: {path}{start}")
    assert stderr.endswith("; the file is damaged or incomplete\n") and stderr.count("\n") == 1


def _error_line(stderr: str) -> str:
    """The one error line; `data check` writes its progress to stderr too (its stdout is the report), before it."""
    lines = stderr.strip().split("\n")
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and "Traceback" not in stderr
    return lines[-1]


def test_damaged_gzip_in_data_check_and_eval(tmp_path, capsys, adapter, untrained_tiny):
    path = tmp_path / "corrupt.jsonl.gz"
    _gzip_with_corrupt_body(path)
    for args in (["data", "check", path], ["data", "check", path, "--model", untrained_tiny["model"]],
                 ["eval", "--adapter", adapter, "--data", path, "--on-invalid", "skip"]):  # fmt: skip
        code, _, stderr = run_cli_inprocess(capsys, *args)
        assert code == 2 and _error_line(stderr).startswith(f"error: {path}: cannot read (Error -3 while"), stderr


def test_damaged_gzip_in_a_real_process_gives_no_traceback(tmp_path):
    path = tmp_path / "corrupt.jsonl.gz"
    _gzip_with_corrupt_body(path)
    result = run_cli_subprocess("data", "check", path, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: cannot read (Error -3")


def test_paths_that_are_no_data_file_are_one_line(tmp_path, capsys, train_args, adapter):
    a_file = tmp_path / "train.jsonl"
    a_file.write_text(_lines(GOOD, OTHER), encoding="utf-8")
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)  # opening it would wait for a writer forever
    supported = ".jsonl, .json, .parquet (optionally .gz or .zst) or a folder saved by datasets.save_to_disk"
    not_utf8 = tmp_path / os.fsdecode(b"caf\xe9.jsonl")  # Latin-1 bytes in a name
    not_utf8.write_text(_lines(GOOD, OTHER), encoding="utf-8")
    cases = {
        not_utf8: ": the path is not valid UTF-8, and places in the data are kept as text; rename it",
        a_file / "x.jsonl": f": {a_file} is a file, not a folder; check the path",
        a_file / "deeper" / "x.jsonl": f": {a_file} is a file, not a folder; check the path",
        pipe: f": is not a regular file (a pipe, device or socket); pass {supported}",
        tmp_path: f": is a folder but not one saved by datasets.save_to_disk; pass {supported}",
    }
    for path, expected in cases.items():
        for args in (train_args(path, "--on-invalid", "skip"), ["data", "check", path],
                     ["eval", "--adapter", adapter, "--data", path]):  # fmt: skip
            code, _, stderr = run_cli_inprocess(capsys, *args)
            shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")  # caf\xe9.jsonl
            assert (code, stderr) == (2, f"error: {shown}{expected}\n"), args


def test_an_unreadable_file_is_one_line(tmp_path, capsys, train_args):
    if os.geteuid() == 0:
        pytest.skip("runs as root, who reads any file: chmod cannot make one unreadable here")
    path = tmp_path / "secret.jsonl"
    path.write_text(_lines(GOOD), encoding="utf-8")
    path.chmod(0)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path))
    assert (code, stderr) == (2, f"error: {path}: permission denied; make the file readable\n")


# The cost of a hostile line ----------------------------------------------------------------------------------------


def _prepare(tokenizer, path: Path, max_length: int, **data):
    from dpo_cli.data.load import load_tokenized_split
    from dpo_cli.data.split import SplitRequest

    request = SplitRequest([str(path)], "train", DataSection(max_length=max_length, **data))
    return load_tokenized_split(tokenizer, request)


@pytest.fixture
def tokenizer(untrained_tiny):
    from dpo_cli.model.load import load_tokenizer

    return load_tokenizer(str(untrained_tiny["model"]))


def test_a_prompt_too_long_to_fit_is_set_aside_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    """8 MB of prompt took main 75 s and 3 GB (tokenized in full, then dropped); now it is refused on its length."""
    from dpo_cli.data import tokenize as tokenization  # tokenize_batch calls text_pairs_ids through its module

    seen: list[int] = []
    real = tokenization.text_pairs_ids

    def spy(tokenizer, prompts, chosen, rejected):
        seen.extend(len(text) for text in prompts + chosen + rejected)
        return real(tokenizer, prompts, chosen, rejected)

    monkeypatch.setattr(tokenization, "text_pairs_ids", spy)
    path = tmp_path / "long.jsonl"
    path.write_text(_lines(GOOD, _record(json.dumps("once upon a time " * 500_000)), OTHER), encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(Exception, match="is 8,500,000 characters, more than max_length=64 tokens can hold"):
        _prepare(tokenizer, path, 64)
    pairs, summary = _prepare(tokenizer, path, 64, on_invalid="skip")
    assert time.perf_counter() - started < 10  # generous for a loaded machine; main took minutes
    assert len(pairs) == 2 and summary.dropped_long_prompt == [f"{path}:2"]
    assert max(seen) < 100  # only the two good pairs reached the tokenizer


def test_data_check_leaves_untokenized_prompts_out_of_the_token_counts(tmp_path, capsys, untrained_tiny):
    path = tmp_path / "long.jsonl"
    path.write_text(_lines(GOOD, _record(json.dumps("x" * 70_000)), OTHER), encoding="utf-8")
    args = ["data", "check", path, "--model", untrained_tiny["model"], "--max-length", 64, "--json"]
    code, stdout, _ = run_cli_inprocess(capsys, *args)
    total = json.loads(stdout)["total"]
    assert code == 1 and total["dropped"] == 1 and total["pairs"] == 3
    assert total["tokens"]["prompt"]["max"] < 64 and total["tokens"]["prompt"]["mean"] > 0


def test_cut_completions_keep_exactly_the_ids_full_tokenization_keeps(tmp_path, tokenizer):
    """A completion is tokenized only up to 2 x max_length x 64 characters; the ids kept at max_length, and whether
    they were cut, are those of tokenizing it whole (`tokenize_pair`, the slow obvious reference)."""
    from dpo_cli.data.records import PreferencePair
    from dpo_cli.data.tokenize import tokenize_pair

    max_length = 24
    long = " ".join(f"word{i}" for i in range(2000))  # 15,889 characters, over the 3,072 tokenized
    records = [
        {"prompt": "Once upon a time", "chosen": long, "rejected": " short"},
        {"prompt": "Hello there.", "chosen": long, "rejected": long[5:]},
        {"prompt": "Hi", "chosen": " a" * 3000, "rejected": "b" * 9000},
    ]
    path = tmp_path / "long_completions.jsonl"
    path.write_text(_lines(*map(json.dumps, records)), encoding="utf-8")
    pairs, summary = _prepare(tokenizer, path, max_length)
    assert summary.truncated == len(records)
    for record, row in zip(records, pairs, strict=True):
        pair = PreferencePair(record["prompt"], record["chosen"], record["rejected"], "")
        expected, truncated = tokenize_pair(tokenizer, pair, max_length)
        assert truncated
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            expected.prompt_ids, expected.chosen_ids, expected.rejected_ids,
        )  # fmt: skip


def test_long_chat_completions_keep_the_ids_of_full_rendering(tmp_path, tokenizer):
    from dpo_cli.data.records import PreferencePair
    from dpo_cli.data.tokenize import tokenize_pair

    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    (tmp_path / "chat.jinja").write_text(template, encoding="utf-8")
    prompt = [{"role": "user", "content": "Tell me a story"}]
    chosen = [{"role": "assistant", "content": "once " * 2000}, {"role": "user", "content": "more"}]
    chosen += [{"role": "assistant", "content": "again " * 500}]
    rejected = [{"role": "assistant", "content": "no"}] * 200
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n", encoding="utf-8")
    (row,), _ = _prepare(tokenizer, path, 64, chat_template=str(tmp_path / "chat.jinja"))
    expected, truncated = tokenize_pair(tokenizer, PreferencePair(prompt, chosen, rejected, ""), 64)
    assert truncated and row["chosen_ids"] == expected.chosen_ids and row["rejected_ids"] == expected.rejected_ids
    assert row["prompt_ids"] == expected.prompt_ids


def test_the_record_limit_grows_with_max_length():
    from dpo_cli.data.prepare import read_options

    assert read_options(DataSection(max_length=1024)).max_record_bytes == MAX_RECORD_BYTES
    assert read_options(DataSection(max_length=32768)).max_record_bytes == 4096 * 32768


def test_long_shared_dialogues_split_quickly_and_as_before():
    import os.path
    import random

    from dpo_cli.data.formats import common_prefix

    rng = random.Random(0)
    for _ in range(2000):
        a = "".join(rng.choice("ab") for _ in range(rng.randrange(12)))
        b = "".join(rng.choice("ab") for _ in range(rng.randrange(12)))
        assert common_prefix(a, b, chunk=rng.choice([1, 2, 3, 4096])) == os.path.commonprefix([a, b])
    shared = "\n\nHuman: hi\n\nAssistant: " * 400_000  # 9.6 million characters in common
    started = time.perf_counter()
    assert common_prefix(shared + "yes", shared + "no") == shared
    assert time.perf_counter() - started < 1  # the character loop of os.path.commonprefix takes seconds


# The data cache ----------------------------------------------------------------------------------------------------


def _entry(cache: Path) -> Path:
    (entry,) = (cache / "prepared").iterdir()
    return entry


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "tokenized.arrow cut short": lambda entry: _truncate(entry / "tokenized.arrow"),
    "texts.arrow cut short": lambda entry: _truncate(entry / "texts.arrow"),
    "texts.arrow emptied": lambda entry: (entry / "texts.arrow").write_bytes(b""),
    "invalid.jsonl missing": lambda entry: (entry / "invalid.jsonl").unlink(),
    "invalid.jsonl garbled": lambda entry: (entry / "invalid.jsonl").write_text("{not json\n"),
    "meta.json garbled": lambda entry: (entry / "meta.json").write_text("{"),
    "meta.json of an older layout": lambda entry: (entry / "meta.json").write_text('{"files": []}'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_entry_is_prepared_again(damage, tmp_path, tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO_CLI_CACHE", str(cache))
    path = tmp_path / "data.jsonl"
    path.write_text(_lines(GOOD, '{"prompt": "p", "chosen": "same", "rejected": "same"}', OTHER), encoding="utf-8")
    from dpo_cli.data.load import load_tokenized_split
    from dpo_cli.data.split import SplitRequest

    request = SplitRequest([str(path)], "train", DataSection(on_invalid="skip", max_length=64))
    first, _ = load_tokenized_split(tokenizer, request)
    expected = first.to_list()
    del first  # it maps the files about to be damaged
    DAMAGE[damage](_entry(cache))
    printed: list[str] = []
    again, summary = load_tokenized_split(tokenizer, request, printed.append)
    assert f"train data: the prepared copy in {_entry(cache)} is damaged or incomplete; preparing it again" in printed
    assert not summary.from_cache and again.to_list() == expected and len(summary.skipped) == 1
    _, summary = load_tokenized_split(tokenizer, request)
    assert summary.from_cache
    assert [p.name for p in (cache / "prepared").iterdir()] == [_entry(cache).name]  # no leftovers


def test_a_damaged_cache_entry_is_prepared_again_by_train(tmp_path, capsys, train_args, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO_CLI_CACHE", str(cache))
    path = tmp_path / "data.jsonl"
    path.write_text(_lines(GOOD, OTHER), encoding="utf-8")
    code, _, stderr = run_cli_inprocess(capsys, "data", "check", path, "--model", train_args(path)[2])
    assert code == 0, stderr
    _truncate(_entry(cache) / "tokenized.arrow")
    code, stdout, stderr = run_cli_inprocess(capsys, *train_args(path, "--batch-size", 2))
    assert code == 0, stderr
    assert "is damaged or incomplete; preparing it again" in " ".join(stdout.split())


SEPARATORS = ["\u2028", "\u2029", "\x85"]


def test_line_separators_in_skipped_records_keep_one_record_per_line(tmp_path, capsys, untrained_tiny, monkeypatch):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines(): a skipped record holding them once made a
    cache entry that train, eval and data check could not read back."""
    monkeypatch.setenv("DPO_CLI_CACHE", str(tmp_path / "cache"))
    bad = [
        json.dumps({"prompt": f"a{s}b", "chosen": f"x{s}", "rejected": f"x{s}"}, ensure_ascii=False) for s in SEPARATORS
    ]
    bad.append('{"prompt": "a\u2028", "chosen": 3, "rejected": "b"}')
    bad.append('{"prompt": "a\x85b", "chosen": "c", "rej')
    path = tmp_path / "separators.jsonl"
    path.write_text(_lines(GOOD, *bad, OTHER), encoding="utf-8")
    model = untrained_tiny["model"]
    for run in ("prepares", "reads the cache"):
        out = tmp_path / run
        args = ["--data", path, "--output-dir", out, "--max-steps", 1, "--on-invalid", "skip", "--batch-size", 2]
        code, stdout, stderr = run_cli_inprocess(capsys, "train", "--model", model, *args)
        assert code == 0, (run, stderr)
        text = (out / "skipped-train.jsonl").read_text(encoding="utf-8")
        assert len(text.splitlines()) == len(bad)  # any line reader splits it right
        assert [json.loads(line)["record"] for line in text.splitlines()] == bad  # the records as they were
        assert not any(s in text for s in SEPARATORS)
        assert ("from cache" in stdout) == (run == "reads the cache")
    code, stdout, stderr = run_cli_inprocess(capsys, "data", "check", path, "--model", model, "--json")
    assert code == 1 and json.loads(stdout)["total"]["pairs"] == 2, stderr


# A cache folder that cannot be written ----------------------------------------------------------------------------


def test_a_cache_below_a_file_is_one_line_before_the_model_loads(tmp_path, capsys, train_args, adapter, monkeypatch):
    from dpo_cli.run import setup as setup_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the cache was found unwritable")

    monkeypatch.setattr(setup_module, "load_base_model", no_model)
    a_file = tmp_path / "plain-file"
    a_file.write_text("")
    path = tmp_path / "data.jsonl"
    path.write_text(_lines(GOOD, OTHER), encoding="utf-8")
    for cache in (a_file, a_file / "cache"):
        monkeypatch.setenv("DPO_CLI_CACHE", str(cache))
        expected = f"error: {cache}: data cache: a part of this path is a file, not a folder; {CACHE_HINT}\n"
        for args in (train_args(path), ["data", "check", path, "--model", train_args(path)[2]],
                     ["eval", "--adapter", adapter, "--data", path]):  # fmt: skip
            code, _, stderr = run_cli_inprocess(capsys, *args)
            assert (code, stderr) == (2, expected), args
    monkeypatch.delenv("DPO_CLI_CACHE")
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path, "--set", f"data.cache_dir={a_file / 'c'}"))
    assert (code, stderr) == (2, f"error: {a_file / 'c'}: data cache: a part of this path is a file, not a folder; "
                                 f"{CACHE_HINT}\n")  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root with mount rights only); yields a function (folder, options) -> folder."""
    mounted: list[Path] = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_cache_is_one_line_unless_it_holds_the_data(tmp_path, capsys, train_args, tmpfs, monkeypatch):
    cache = tmpfs(tmp_path / "ro-cache", "size=4m")
    monkeypatch.setenv("DPO_CLI_CACHE", str(cache))
    path = tmp_path / "data.jsonl"
    path.write_text(_lines(GOOD, OTHER), encoding="utf-8")
    prepared = tmp_path / "prepared.jsonl"
    prepared.write_text(_lines(OTHER, GOOD), encoding="utf-8")
    model = train_args(path)[2]
    assert run_cli_inprocess(capsys, "data", "check", prepared, "--model", model)[0] == 0
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path))
    assert (code, stderr) == (2, f"error: {cache}: data cache: cannot write there (Read-only file system); "
                                 f"{CACHE_HINT}\n")  # fmt: skip
    code, stdout, stderr = run_cli_inprocess(capsys, *train_args(prepared, "--batch-size", 2))
    assert code == 0 and "from cache" in stdout, stderr  # prepared before: read, not written


def test_a_full_cache_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, train_args, tmpfs, monkeypatch):
    cache = tmpfs(tmp_path / "small-cache", "size=256k")
    monkeypatch.setenv("DPO_CLI_CACHE", str(cache))
    path = tmp_path / "data.jsonl"
    story = "once upon a time " * 20
    records = (json.dumps({"prompt": f"{i} {story}", "chosen": " good", "rejected": " bad"}) for i in range(3000))
    path.write_text(_lines(*records), encoding="utf-8")
    code, _, stderr = run_cli_inprocess(capsys, *train_args(path))
    expected = f"error: {cache}: data cache: no space left for the prepared data; free space there or {CACHE_HINT}\n"
    assert (code, stderr) == (2, expected)
    assert list((cache / "prepared").iterdir()) == []  # the half-built folder is gone


def test_one_run_prepares_at_a_time_and_clears_what_killed_builds_left(tmp_path, tokenizer, monkeypatch):
    import fcntl
    import threading

    from dpo_cli.data.load import load_tokenized_split
    from dpo_cli.data.split import SplitRequest

    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO_CLI_CACHE", str(cache))
    path = tmp_path / "data.jsonl"
    path.write_text(_lines(GOOD, OTHER), encoding="utf-8")
    request = SplitRequest([str(path)], "train", DataSection(max_length=64))
    first, _ = load_tokenized_split(tokenizer, request)
    expected = first.to_list()
    del first
    entry = _entry(cache)
    shutil.rmtree(entry)
    killed = [entry.with_name(f".{entry.name}.k1ll3d.tmp"), entry.with_name(f".{entry.name}.old")]
    for folder in killed:  # what a build killed while writing, or while replacing, leaves
        folder.mkdir()
        (folder / "texts.arrow").write_bytes(b"half")
    with open(lock_path(entry), "a") as lock:  # another run is preparing the same data
        fcntl.flock(lock, fcntl.LOCK_EX)
        threading.Timer(1.0, fcntl.flock, (lock, fcntl.LOCK_UN)).start()
        printed: list[str] = []
        started = time.perf_counter()
        again, summary = load_tokenized_split(tokenizer, request, printed.append)
    assert time.perf_counter() - started >= 1.0
    assert f"train data: another run is preparing it in {entry}; waiting" in printed
    assert not summary.from_cache and again.to_list() == expected
    assert not any(folder.exists() for folder in killed)
