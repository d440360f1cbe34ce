"""The reference log-prob cache (run/reference.py): a cached entry equals a fresh computation and trains exactly as
the live reference; every input of its fingerprint makes a new entry and nothing else does; a damaged entry is
computed again; a run, an eval step or `dpo-cli eval` that finds it never runs the reference model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import pytest
import torch
from rich.console import Console

from dpo_cli.config import recipe_from_dict
from dpo_cli.errors import UserError

LINE = "reference log-probs: "


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Llama folder and 10 preference pairs (its 4-bit load and a run's setup take about a second)."""
    from tests.conftest import write_tiny_model_and_pairs

    model, data = write_tiny_model_and_pairs(tmp_path_factory.mktemp("reference-cache"))
    return {"model": model, "data": data}


def _recipe(inputs, output_dir, cache, data_file=None, model_dir=None, **sections):
    values = {
        "model": {"path": str(model_dir or inputs["model"]), "gradient_checkpointing": False},
        "data": {"train": [str(data_file or inputs["data"])], "cache_dir": str(cache), "layout": "padded"},
        "training": {
            "output_dir": str(output_dir),
            "max_steps": 3,  # 3 x 4 pairs: every one of the 10 pairs is visited
            "batch_size": 4,
            "eval_batch_size": 3,
            "lr": 1e-2,
            "save_steps": 0,
        },
        "dpo": {"beta": 0.5, "precompute_ref": "true"},
    }
    for section, keys in sections.items():
        values[section] = {**values[section], **keys}
    return recipe_from_dict(values)


def _build(recipe):
    """(the run, the lines it printed about the reference)."""
    from dpo_cli.run.setup import build_run

    out = io.StringIO()
    run = build_run(recipe, console=Console(file=out, width=400))
    lines = [line for line in out.getvalue().splitlines() if LINE in line]
    return run, lines


def _forbid_the_reference_model(monkeypatch):
    """Any reference pass, precomputed or live, fails the test."""
    from dpo_cli.dpo import scoring
    from dpo_cli.run import reference

    def refuse(*args):
        raise AssertionError("the reference model ran")

    monkeypatch.setattr(scoring, "reference_logps", refuse)
    monkeypatch.setattr(reference, "reference_sequence_logps", refuse)


def _entries(cache) -> list:
    folder = cache / "reference"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


# cached == fresh, and a rerun never runs the reference ---------------------------------------------------------------


def test_a_rerun_reads_the_cache_equal_to_a_fresh_pass_and_trains_like_the_live_reference(
    inputs, tmp_path, monkeypatch
):
    from dpo_cli.run.loop import train_step
    from dpo_cli.run.reference import precompute_reference_logps

    cache = tmp_path / "cache"
    first, lines = _build(_recipe(inputs, tmp_path / "first", cache))
    assert len(lines) == 1 and "computed 10 pairs in" in lines[0] and "cached at" in lines[0], lines
    (entry,) = _entries(cache)
    assert str(cache / "reference" / entry) in lines[0]
    fresh = precompute_reference_logps(
        first.model, first.train_pairs, first.tokenizer.pad_token_id, first.recipe.dpo, 3, Console(quiet=True)
    )

    with monkeypatch.context() as patch:
        _forbid_the_reference_model(patch)
        second, lines = _build(_recipe(inputs, tmp_path / "second", cache))
        cached_record = train_step(second)
    assert lines == [f"{LINE}read from cache {cache / 'reference' / entry}"]
    assert torch.equal(second.train_ref_logps, fresh), "the same layout and batches give the very same floats"

    live, lines = _build(_recipe(inputs, tmp_path / "live", cache, dpo={"precompute_ref": "false"}))
    assert live.train_ref_logps is None and lines == []
    live_record = train_step(live)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
        assert cached_record[key] == pytest.approx(live_record[key], rel=1e-5, abs=1e-7), key


def test_stories260k_4bit_cache_equals_a_fresh_pass_in_another_layout(stories_model, stories_data, tmp_path):
    """Layouts are left out of the fingerprint: the values they give differ only at float rounding."""
    from dpo_cli.run.reference import precompute_reference_logps

    cache = tmp_path / "cache"

    def recipe(name, layout):
        return _recipe(
            {"model": stories_model, "data": stories_data["test"]},
            tmp_path / name,
            cache,
            data={"layout": layout, "max_length": 128},
            training={"max_steps": 0, "epochs": 1.0, "eval_batch_size": 8},
        )

    padded, lines = _build(recipe("padded", "padded"))
    assert "computed" in lines[0], lines
    shared, lines = _build(recipe("shared", "shared-prompt"))
    assert "read from cache" in lines[0] and shared.layout == "shared-prompt", lines
    fresh = precompute_reference_logps(
        shared.model, shared.train_pairs, shared.tokenizer.pad_token_id, shared.recipe.dpo, 5, Console(quiet=True),
        layout="shared-prompt",
    )  # fmt: skip
    torch.testing.assert_close(shared.train_ref_logps, fresh, rtol=1e-6, atol=1e-5)
    assert torch.equal(shared.train_ref_logps, padded.train_ref_logps)


# What makes a new entry ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_entry(inputs, tmp_path_factory):
    """A cache holding the entry of the base settings."""
    cache = tmp_path_factory.mktemp("shared-cache")
    _, lines = _build(_recipe(inputs, tmp_path_factory.mktemp("base") / "run", cache))
    assert "computed" in lines[0], lines
    return cache


@pytest.mark.parametrize(
    ("changes", "reused"),
    [
        ({"data": {"max_length": 24}}, False),
        ({"dpo": {"ld_alpha": 0.5}}, False),
        ({"model": {"quantize": False}}, False),
        ({"data": {"layout": "shared-prompt"}}, True),
        ({"training": {"batch_size": 2, "eval_batch_size": 7, "max_steps": 5}}, True),
        ({"dpo": {"beta": 0.2, "loss_type": ["ipo"]}}, True),  # the loss reads the same reference values
        ({"model": {"gradient_checkpointing": True}}, True),
    ],
    ids=["max_length", "ld_alpha", "quantization", "layout", "batch-size", "loss", "checkpointing"],
)
def test_a_fingerprint_input_makes_a_new_entry_and_nothing_else_does(
    inputs, first_entry, tmp_path, monkeypatch, changes, reused
):
    entries = _entries(first_entry)
    with monkeypatch.context() as patch:
        if reused:
            _forbid_the_reference_model(patch)
        run, lines = _build(_recipe(inputs, tmp_path / "run", first_entry, **changes))
    assert len(lines) == 1, lines
    assert ("read from cache" in lines[0]) == reused, lines
    assert (_entries(first_entry) == entries) == reused
    assert run.train_ref_logps.shape == (10, 2)


def test_the_data_files_bytes_not_their_path_or_time_decide(inputs, tmp_path):
    cache = tmp_path / "cache"
    data = tmp_path / "train.jsonl"
    original = inputs["data"].read_bytes()
    data.write_bytes(original)
    _, lines = _build(_recipe(inputs, tmp_path / "a", cache, data_file=data))
    assert "computed" in lines[0]
    records = [json.loads(line) for line in original.decode().splitlines()]
    records[3]["chosen"] += " more"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, lines = _build(_recipe(inputs, tmp_path / "b", cache, data_file=data))
    assert "computed" in lines[0], "an edited file is other pairs"
    data.write_bytes(original)  # back to the first bytes, with a new modification time
    _, lines = _build(_recipe(inputs, tmp_path / "c", cache, data_file=data))
    assert "read from cache" in lines[0], lines
    assert len(_entries(cache)) == 2


def test_the_base_weights_content_decides_and_its_hash_is_remembered(inputs, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from dpo_cli.run import reference

    cache = tmp_path / "cache"
    copy = tmp_path / "model-copy"
    shutil.copytree(inputs["model"], copy)
    _, lines = _build(_recipe(inputs, tmp_path / "a", cache, model_dir=inputs["model"]))
    assert "computed" in lines[0]
    memo = json.loads((cache / reference.HASH_MEMO).read_text())
    assert str((inputs["model"] / "model.safetensors").resolve()) in memo

    hashed = []
    original_sha256 = reference.file_sha256

    def counting_sha256(path, memo):
        before = dict(memo)
        digest = original_sha256(path, memo)
        if memo != before:
            hashed.append(path.name)
        return digest

    monkeypatch.setattr(reference, "file_sha256", counting_sha256)
    _, lines = _build(_recipe(inputs, tmp_path / "b", cache, model_dir=copy))
    assert "read from cache" in lines[0], "the same bytes in another folder are the same model"
    assert sorted(hashed) == ["config.json", "model.safetensors"], "a new path is hashed once"
    hashed.clear()
    _, lines = _build(_recipe(inputs, tmp_path / "c", cache, model_dir=copy))
    assert hashed == [], "a file of unchanged size and mtime is not read again"

    weights = load_file(copy / "model.safetensors")
    name = next(key for key in weights if key.endswith("q_proj.weight"))
    weights[name][0, 0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    _, lines = _build(_recipe(inputs, tmp_path / "d", cache, model_dir=copy))
    assert "computed" in lines[0], "changed weights are another reference"
    assert len(_entries(cache)) == 2


# Damaged entries and an unwritable cache -----------------------------------------------------------------------------


def _damage_truncated(entry):
    path = entry / "logps.safetensors"
    path.write_bytes(path.read_bytes()[:-7])


def _damage_missing(entry):
    (entry / "logps.safetensors").unlink()


def _rewrite(entry, values):
    """New values with a consistent size and content hash in meta.json: only the values themselves tell."""
    from safetensors.torch import save

    data = save({"logps": values})
    (entry / "logps.safetensors").write_bytes(data)
    meta = json.loads((entry / "meta.json").read_text())
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (entry / "meta.json").write_text(json.dumps(meta))


def _tamper(entry):
    """The issue's case: the cached chosen log-probs lowered by 500, same shape and size, meta.json untouched."""
    from safetensors.torch import load, save

    path = entry / "logps.safetensors"
    values = load(path.read_bytes())["logps"]
    values[:, 0] -= 500
    data = save({"logps": values})
    assert len(data) == path.stat().st_size
    path.write_bytes(data)


def _damage_one_byte(entry):
    path = entry / "logps.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a bit flip in a float: still finite, same size
    path.write_bytes(bytes(data))


def _damage_no_hash(entry):
    """An entry of an older dpo-cli, whose meta.json records sizes only."""
    meta = json.loads((entry / "meta.json").read_text())
    del meta["sha256"]
    (entry / "meta.json").write_text(json.dumps(meta))


def _damage_shape(entry):
    _rewrite(entry, torch.zeros(9, 2))


def _damage_nan(entry):
    values = torch.zeros(10, 2)
    values[4, 1] = float("nan")
    _rewrite(entry, values)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_damage_truncated, "bytes"),
        (_damage_missing, "No such file"),
        (_damage_shape, "(9, 2)"),
        (_damage_nan, "non-finite"),
        (_tamper, "does not match the content hash"),
        (_damage_one_byte, "does not match the content hash"),
        (_damage_no_hash, "records no content hash"),
    ],
    ids=["truncated", "missing", "shape", "nan", "tampered", "bit-flip", "no-hash"],
)
def test_a_damaged_entry_is_computed_again_with_a_note(inputs, tmp_path, damage, why):
    cache = tmp_path / "cache"
    first, _ = _build(_recipe(inputs, tmp_path / "a", cache))
    (name,) = _entries(cache)
    damage(cache / "reference" / name)
    again, lines = _build(_recipe(inputs, tmp_path / "b", cache))
    assert len(lines) == 2, lines
    assert "is damaged" in lines[0] and why in lines[0] and "computing it again" in lines[0], lines
    assert "computed 10 pairs" in lines[1] and "cached at" in lines[1], lines
    assert torch.equal(again.train_ref_logps, first.train_ref_logps)
    _, lines = _build(_recipe(inputs, tmp_path / "c", cache))
    assert "read from cache" in lines[0], "the entry is whole again"


def test_an_unwritable_cache_keeps_the_values_in_memory_with_one_line(inputs, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "reference").write_text("a file where the folder would go")
    run, lines = _build(_recipe(inputs, tmp_path / "a", cache))
    assert len(lines) == 2 and "cannot be written" in lines[0] and "in memory" in lines[1], lines
    assert run.train_ref_logps.shape == (10, 2)


# When it is on -------------------------------------------------------------------------------------------------------


def test_auto_precomputes_for_a_whole_epoch_or_a_cached_entry_else_scores_live(inputs, tmp_path):
    cache = tmp_path / "cache"
    auto = {"precompute_ref": "auto"}
    short, lines = _build(_recipe(inputs, tmp_path / "a", cache, training={"max_steps": 2}, dpo=auto))
    assert short.train_ref_logps is None and "scored live in each step" in lines[0], lines
    assert _entries(cache) == []
    epoch, lines = _build(_recipe(inputs, tmp_path / "b", cache, training={"max_steps": 0, "epochs": 1.0}, dpo=auto))
    assert epoch.train_ref_logps is not None and "computed" in lines[0], lines
    short, lines = _build(_recipe(inputs, tmp_path / "c", cache, training={"max_steps": 2}, dpo=auto))
    assert short.train_ref_logps is not None and "read from cache" in lines[0], "a finished entry is always used"
    off, lines = _build(_recipe(inputs, tmp_path / "d", cache, dpo={"precompute_ref": "false"}))
    assert off.train_ref_logps is None and lines == []


def test_precompute_ref_takes_the_old_booleans_and_refuses_other_values():
    assert recipe_from_dict({}).dpo.precompute_ref == "auto"
    assert recipe_from_dict({"dpo": {"precompute_ref": True}}).dpo.precompute_ref == "true"
    assert recipe_from_dict({"dpo": {"precompute_ref": False}}).dpo.precompute_ref == "false"
    with pytest.raises(UserError, match="dpo.precompute_ref: 'sometimes' is not one of auto, true, false"):
        recipe_from_dict({"dpo": {"precompute_ref": "sometimes"}})
    simpo = {"reference_free": True, "gamma": 0.5}
    assert recipe_from_dict({"dpo": {**simpo, "precompute_ref": "false"}}).dpo.reference_free
    with pytest.raises(UserError, match="there is no reference to precompute"):
        recipe_from_dict({"dpo": {**simpo, "precompute_ref": "true"}})


def test_a_resumed_run_reads_the_entry_its_first_part_cached(inputs, tmp_path, monkeypatch):
    from dpo_cli.run.loop import train

    cache = tmp_path / "cache"
    first = train(_recipe(inputs, tmp_path / "run", cache, training={"max_steps": 2}), console=Console(quiet=True))
    assert first.steps == 2 and len(_entries(cache)) == 1
    out = io.StringIO()
    with monkeypatch.context() as patch:
        _forbid_the_reference_model(patch)
        resumed = train(_recipe(inputs, tmp_path / "run", cache), resume=True, console=Console(file=out, width=400))
    assert resumed.steps == 3 and "resuming from" in out.getvalue()
    assert f"{LINE}read from cache" in out.getvalue()


# Evaluation reads it -------------------------------------------------------------------------------------------------


def test_eval_steps_and_dpo_cli_eval_read_the_cached_eval_reference(inputs, tmp_path, monkeypatch):
    from dpo_cli.demo.tiny import make_pairs, write_jsonl
    from dpo_cli.run.eval_adapter import EvalOptions, run_eval
    from dpo_cli.run.loop import train

    cache = tmp_path / "cache"
    held_out = write_jsonl(tmp_path / "eval.jsonl", make_pairs(6, seed=9))
    recipe = _recipe(inputs, tmp_path / "run", cache, data={"eval": [str(held_out)]}, training={"eval_steps": 1})
    out = io.StringIO()
    result = train(recipe, console=Console(file=out, width=400))
    lines = [line for line in out.getvalue().splitlines() if LINE in line]
    assert len(lines) == 2 and lines[1].startswith("eval reference log-probs: computed 6 pairs"), lines
    assert len(_entries(cache)) == 2

    def evaluate(precompute_ref):
        overrides = {"data": {"eval": [str(held_out)]}, "dpo": {"precompute_ref": precompute_ref}}
        out = io.StringIO()
        report = run_eval(EvalOptions(adapter=result.output_dir, overrides=overrides), Console(file=out, width=400))
        return report.result["metrics"], [line for line in out.getvalue().splitlines() if LINE in line]

    with monkeypatch.context() as patch:
        _forbid_the_reference_model(patch)
        cached, lines = evaluate("auto")
    assert len(lines) == 1 and "read from cache" in lines[0], lines
    live, lines = evaluate("false")
    assert lines == []
    for key, value in live.items():
        assert cached[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert cached["rewards/margins"] != 0.0, "the adapter moved, so the reference matters"
