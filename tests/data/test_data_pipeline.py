"""Containers, the prepared-data cache, the train/eval split, parallel tokenization and `dpo-cli data check`."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import pytest

from dpo_cli.config import DataSection
from dpo_cli.data.load import load_tokenized_split
from dpo_cli.data.records import ReadOptions, ReadResult, iter_file_pairs
from dpo_cli.data.split import SplitRequest, training_requests
from dpo_cli.errors import UserError
from tests.conftest import SHARED_DATA, STORIES_MODEL, require_shared, run_cli_inprocess


@pytest.fixture
def tokenizer(untrained_tiny):
    """A fresh tokenizer per test (some tests change it); the built-in tiny one, so no ../shared is needed."""
    from dpo_cli.model.load import load_tokenizer

    return load_tokenizer(str(untrained_tiny["model"]))


@pytest.fixture
def records() -> list[dict]:
    """40 pairs of the tiny demo's kind; one holds non-ASCII text."""
    from dpo_cli.demo.tiny import make_pairs

    pairs = make_pairs(40, seed=3)
    pairs[28]["rejected"] += " “Wh…” — café"
    return pairs


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _texts(path) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in iter_file_pairs(path, ReadOptions(), ReadResult())]


def test_every_container_gives_the_same_pairs(records, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    (tmp_path / "a.jsonl").write_bytes(_jsonl(records))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(records)))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(records)))
    (tmp_path / "pretty.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(records).encode()))
    (tmp_path / "lines.json").write_bytes(_jsonl(records))  # JSON lines under a .json name
    (tmp_path / "gz-named-plain.jsonl.gz").write_bytes(_jsonl(records))  # the bytes decide, not the name
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "pretty.json", "a.json.gz", "lines.json",
                 "gz-named-plain.jsonl.gz", "a.parquet", "saved"):  # fmt: skip
        assert _texts(tmp_path / name) == expected, name
    places = [p.source for p in iter_file_pairs(tmp_path / "pretty.json", ReadOptions(), ReadResult())]
    assert places[:2] == [f"{tmp_path / 'pretty.json'}:2 (record 0)", f"{tmp_path / 'pretty.json'}:7 (record 1)"]
    rows = [p.source for p in iter_file_pairs(tmp_path / "a.parquet", ReadOptions(), ReadResult())]
    assert rows[3] == f"{tmp_path / 'a.parquet'}: row 3"


def test_a_saved_dataset_dict_names_its_splits(records, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(UserError, match=r"dd: holds several splits \(test, train\); pass one of them, e.g. .*dd/train"):
        _texts(tmp_path / "dd")
    assert len(_texts(tmp_path / "dd" / "train")) == len(records)


def test_several_files_are_read_in_order(records, tokenizer, tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl.gz"
    first.write_bytes(_jsonl(records[:10]))
    second.write_bytes(gzip.compress(_jsonl(records[10:])))
    data = DataSection(max_length=256)
    both, summary = load_tokenized_split(tokenizer, SplitRequest([str(first), str(second)], "train", data))
    alone, _ = load_tokenized_split(tokenizer, SplitRequest([str(first)], "train", data))
    assert len(both) == summary.kept == len(records)
    assert both[:10] == alone[:10]


def test_the_cache_is_reused_and_invalidated_by_data_tokenizer_and_max_length(records, tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl(records))
    data = DataSection(cache_dir=str(tmp_path / "cache"))

    def load(max_length=256):
        request = SplitRequest([str(path)], "train", dataclasses.replace(data, max_length=max_length))
        return load_tokenized_split(tokenizer, request)

    first, summary = load()
    assert not summary.from_cache
    again, summary = load()
    assert summary.from_cache and again[:] == first[:]
    os.utime(path, (1, 1))  # a touch changes nothing that matters
    assert load()[1].from_cache

    path.write_bytes(_jsonl(records[:-1]))
    shorter, summary = load()
    assert not summary.from_cache and len(shorter) == len(records) - 1

    cut = max(len(p["prompt_ids"]) for p in shorter) + 2  # every prompt fits, most completions do not
    shorter_cut, summary = load(max_length=cut)
    assert not summary.from_cache and summary.truncated > 0 and len(shorter_cut) == len(shorter)
    assert max(len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in shorter_cut) == cut

    tokenizer.add_tokens(["happy"])  # a new token changes the ids, so the prepared data must change too
    retokenized, summary = load()
    assert not summary.from_cache and retokenized[:] != shorter[:]
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 4


def test_a_tokenizer_saved_after_padding_names_the_same_prepared_data(tokenizer, tmp_path):
    """The adapter folder's copy of a tokenizer carries the padding state a batch left in it; `dpo-cli eval` with
    that copy must find the data (and the reference log-probs) the training run prepared with the base's."""
    from dpo_cli.data.cache import tokenizer_fingerprint
    from dpo_cli.model.load import load_tokenizer

    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a b", "a"], padding=True, truncation=True, max_length=8)  # leaves padding/truncation set
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = load_tokenizer(str(tmp_path / "saved"))
    assert '"padding": null' not in saved.backend_tokenizer.to_str(), "the saved copy must differ in padding"
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(tokenizer) == before
    saved.add_tokens(["happy"])
    assert tokenizer_fingerprint(saved) != before


def test_a_different_chat_template_prepares_the_data_again(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    record = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hey"}]}
    record["rejected"] = [{"role": "assistant", "content": "Go"}]
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    ids = []
    plain = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with_roles = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for template in (plain, with_roles):
        (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
        data = DataSection(chat_template=str(tmp_path / "t.jinja"), max_length=64)
        pairs, summary = load_tokenized_split(tokenizer, SplitRequest([str(path)], "train", data))
        assert not summary.from_cache
        ids.append(pairs[0]["prompt_ids"])
    assert ids[0] != ids[1]


def test_eval_split_holds_out_the_same_pairs_and_train_gets_the_rest(records, tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl(records))
    data = DataSection(train=[str(path)], eval_split=0.25, max_length=256)
    train_request, eval_request = training_requests(data, None)
    train, _ = load_tokenized_split(tokenizer, train_request)
    held_out, _ = load_tokenized_split(tokenizer, eval_request)
    held_out_again, summary = load_tokenized_split(tokenizer, eval_request)
    everything, _ = load_tokenized_split(tokenizer, SplitRequest([str(path)], "train", DataSection(max_length=256)))
    assert (len(train), len(held_out)) == (30, 10)
    assert summary.from_cache and held_out[:] == held_out_again[:]
    train_keys, held_out_keys = _keys(train), _keys(held_out)
    assert not set(train_keys) & set(held_out_keys)
    assert sorted(train_keys + held_out_keys) == sorted(_keys(everything))


def _keys(pairs) -> list[tuple]:
    return [(tuple(p["prompt_ids"]), tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in pairs]


def test_tokenizing_in_several_processes_gives_the_same_ids(records, tokenizer, tmp_path, monkeypatch):
    import dpo_cli.data.prepare as prepare

    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl(records * 3))
    data = DataSection(cache_dir=str(tmp_path / "a"), max_length=64)
    one, _ = load_tokenized_split(tokenizer, SplitRequest([str(path)], "train", data))
    monkeypatch.setattr(prepare, "PARALLEL_FROM", 10)
    monkeypatch.setattr(prepare, "_worker_count", lambda: 2)
    printed: list[str] = []
    request = SplitRequest([str(path)], "train", dataclasses.replace(data, cache_dir=str(tmp_path / "b")))
    many, _ = load_tokenized_split(tokenizer, request, printed.append)
    assert "train data: tokenizing 120 pairs in 2 processes" in printed
    assert many[:] == one[:]
    prepared = next((tmp_path / "b" / "prepared").iterdir())
    assert len(json.loads((prepared / "meta.json").read_text())["tokenized_files"]) == 2


# dpo-cli data check ---------------------------------------------------------------------------------------------------


def test_data_check_json_report_on_real_hh_rlhf(capsys):
    path = require_shared(SHARED_DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz")
    model = require_shared(STORIES_MODEL)
    code, stdout, _ = run_cli_inprocess(capsys, "data", "check", path, "--model", model, "--max-length", 512, "--json")
    report = json.loads(stdout)
    assert code == 1  # two records have chosen equal to rejected, and some prompts fill 512 tokens
    (file,) = report["files"]
    assert (file["format"], file["records"], file["pairs"]) == ("hh-rlhf", 2354, 2352)
    assert file["chosen_equals_rejected"] == 2 and file["duplicates"] == 0
    identical = file["invalid"]["chosen equals rejected"]
    assert identical["first"] == [f"{path}:722", f"{path}:2169"]
    assert file["dropped"] == file["invalid"]["prompt fills max_length"]["count"] > 0
    assert set(file["tokens"]) == {"prompt", "chosen", "rejected"}
    prompt = file["tokens"]["prompt"]
    assert 0 < prompt["p50"] <= prompt["p95"] <= prompt["max"] and prompt["mean"] > 0
    assert report["total"]["pairs"] == 2352 and report["model"] == str(model)


def test_data_check_counts_duplicates_and_reads_without_a_model(capsys):
    path = require_shared(SHARED_DATA / "sharegpt" / "dpo_en_demo.json")
    code, stdout, _ = run_cli_inprocess(capsys, "data", "check", path, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["model"] is None
    assert report["total"]["duplicates"] == 5 and "tokens" not in report["total"]
    assert report["files"][0]["format"] == "sharegpt"


def test_data_check_table_for_several_files(capsys):
    stories = require_shared(SHARED_DATA / "stories-happy" / "test.jsonl")
    oasst = require_shared(SHARED_DATA / "oasst" / "en_100_tree.jsonl")
    code, stdout, stderr = run_cli_inprocess(capsys, "data", "check", stories, oasst, "--model", STORIES_MODEL)
    assert code == 2 and "conversation, and the tokenizer has no chat template" in stderr
    code, stdout, _ = run_cli_inprocess(capsys, "data", "check", stories, oasst)
    text = " ".join(stdout.split())
    assert code == 0
    assert "explicit" in text and "oasst" in text
    assert "871 pairs from 217 records; 0 exact duplicates, 0 with chosen equal to rejected" in text


# train and eval read every format through the same settings ---------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.slow
def test_train_and_eval_read_conversational_files_with_a_chat_template(tmp_path, capsys):
    openai = require_shared(SHARED_DATA / "openai-dpo" / "validation.jsonl")
    sharegpt = require_shared(SHARED_DATA / "sharegpt" / "dpo_en_demo.json")
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    out = tmp_path / "run"
    reading = ["--on-invalid", "skip", "--chat-template", template]
    code, stdout, stderr = run_cli_inprocess(
        capsys, "train", "--model", STORIES_MODEL, "--data", openai, "--output-dir", out, "--max-steps", 1,
        "--batch-size", 2, "--max-length", 256, "--eval-split", 0.1, "--set", "training.eval_batch_size=64",
        "--set", "model.gradient_checkpointing=false", *reading,
    )  # fmt: skip
    text = " ".join(stdout.split())
    assert code == 0, stderr
    assert "train data: 72 pairs (openai; prepared in" in text and "eval data: 8 pairs (openai; from cache" in text
    skipped = (out / "skipped-train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == 204 and all(json.loads(s)["reason"] == "prompt fills max_length" for s in skipped)
    code, stdout, stderr = run_cli_inprocess(
        capsys, "eval", "--adapter", out, "--data", sharegpt, "--batch-size", 64, "--max-length", 128, *reading
    )  # fmt: skip
    assert code == 0, stderr
    assert "eval data: 55 pairs (sharegpt; prepared in" in " ".join(stdout.split())


def test_a_large_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """The resume fingerprint, the prepared-data key and the model card each ask for a data file's hash."""
    from dpo_cli.data import cache

    monkeypatch.setattr(cache, "REMEMBER_FROM_BYTES", 4)
    monkeypatch.setattr(cache, "_FINGERPRINTS_SEEN", {})
    reads = []
    original = cache._content_hash
    monkeypatch.setattr(cache, "_content_hash", lambda path: reads.append(path) or original(path))
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b"first content")
    first = cache.file_fingerprint(data)
    assert cache.file_fingerprint(data) == first and len(reads) == 1
    data.write_bytes(b"other content")
    os.utime(data, ns=(1, 1))  # a new time, as any rewrite that is not within the same clock tick has
    assert cache.file_fingerprint(data) != first and len(reads) == 2
    small = tmp_path / "tiny.jsonl"
    small.write_bytes(b"abc")  # under the threshold: read every time
    cache.file_fingerprint(small)
    cache.file_fingerprint(small)
    assert len(reads) == 4
