"""Model and adapter folders people are handed: weights that do not fill the model the config describes, damaged
safetensors headers, NaN adapters. Each ends in one line (exit 2) before any training, with nothing written, or
loads fine; never a traceback, never a model with random layers, never a NaN result written."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest

from dpo_cli.errors import UserError
from tests.conftest import run_cli_inprocess


def copy_model(source: Path, target: Path) -> Path:
    """A writable copy of a model folder (the shared one is read-only)."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    return target


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def edit_weights(file: Path, change) -> None:
    """Rewrite a safetensors file with `change(tensors)` applied to its {name: tensor}."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def write_safetensors_header(file: Path, header: dict, data: bytes = b"") -> None:
    """A safetensors file written by hand: 8-byte little-endian header length, the JSON header, the data."""
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def one_line_error(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def stories_copy(stories_model, tmp_path) -> Path:
    return copy_model(stories_model, tmp_path / "base")


# --- the cases of the issue, through the commands ------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [True, False], ids=["4-bit", "no-quantize"])
def test_train_refuses_a_config_with_more_layers_than_the_weights(
    stories_copy, stories_data, tmp_path, capsys, quantize
):
    """num_hidden_layers 8 over 5 layers of weights: today's silent training of 3 random layers is one line."""
    edit_config(stories_copy, num_hidden_layers=8)
    out = tmp_path / "run"
    flags = () if quantize else ("--no-quantize",)
    code, _, stderr = run_cli_inprocess(
        capsys, "train", "--model", stories_copy, "--data", stories_data["train"], "--output-dir", out,
        "--max-steps", "1", *flags,
    )  # fmt: skip
    line = one_line_error(code, stderr, str(stories_copy), "27 weight(s)", "missing", "model.layers.5.")
    assert "and 24 more" in line
    assert not out.exists()


@pytest.mark.parametrize("quantize", [True, False], ids=["4-bit", "no-quantize"])
def test_train_refuses_a_vocab_size_the_weights_do_not_have_fast(
    stories_copy, stories_data, tmp_path, capsys, quantize
):
    """vocab_size 10**12: was a 27-frame RuntimeError after 15 s; now one line naming the weight, in seconds."""
    edit_config(stories_copy, vocab_size=10**12)
    out = tmp_path / "run"
    flags = () if quantize else ("--no-quantize",)
    started = time.monotonic()
    code, _, stderr = run_cli_inprocess(
        capsys, "train", "--model", stories_copy, "--data", stories_data["train"], "--output-dir", out,
        "--max-steps", "1", *flags,
    )  # fmt: skip
    one_line_error(code, stderr, "model.embed_tokens.weight is [512, 64] in the weight files", "1000000000000")
    assert time.monotonic() - started < 15
    assert not out.exists()


def test_a_tied_head_is_not_missing(stories_model):
    """stories260K ties lm_head to the embeddings and stores it once: that is not a missing weight."""
    from dpo_cli.model.base_weights import check_weights_match_config

    assert json.loads((stories_model / "config.json").read_text())["tie_word_embeddings"] is True
    check_weights_match_config(str(stories_model))


def test_an_untied_head_the_files_lack_is_missing(stories_copy):
    from dpo_cli.model.base_weights import check_weights_match_config

    edit_config(stories_copy, tie_word_embeddings=False)
    with pytest.raises(UserError, match=r"describes 1 weight\(s\) missing from the weight files \(lm_head.weight\)"):
        check_weights_match_config(str(stories_copy))


@pytest.fixture
def tiny_base_copy(tiny_demo, tmp_path) -> Path:
    """A copy of the base tiny_adapter was trained on: mangled, passed to eval and merge-adapter with --model."""
    return copy_model(tiny_demo["model"], tmp_path / "base")


def eval_args(adapter: Path, data: Path, output: Path, *extra) -> list:
    return ["eval", "--adapter", adapter, "--data", data, "--output", output, *extra]


def merge_args(adapter: Path, output: Path, *extra) -> list:
    return ["merge-adapter", "--adapter", adapter, "--output", output, *extra]


@pytest.mark.parametrize("command", ["eval", "merge-adapter"])
@pytest.mark.parametrize("quantize", [True, False], ids=["4-bit", "no-quantize"])
def test_eval_and_merge_refuse_a_base_with_missing_layers(
    tiny_adapter, tiny_demo, tiny_base_copy, tmp_path, capsys, command, quantize
):
    edit_config(tiny_base_copy, num_hidden_layers=3)  # the weights hold 2
    out = tmp_path / "out"
    extra = ["--model", tiny_base_copy] + ([] if quantize else ["--set", "model.quantize=false"])
    args = (
        eval_args(tiny_adapter, tiny_demo["test"], out, *extra)
        if command == "eval"
        else merge_args(tiny_adapter, out, *extra)
    )
    code, _, stderr = run_cli_inprocess(capsys, *args)
    one_line_error(code, stderr, str(tiny_base_copy), "missing", "model.layers.2.")
    assert not out.exists()


# --- NaN adapters ----------------------------------------------------------------------------------------------


def nan_adapter(adapter: Path, target: Path, value: float = math.nan) -> Path:
    """A copy of `adapter` with one LoRA B entry set to `value`."""
    copy_model(adapter, target)

    def poison(tensors):
        key = sorted(name for name in tensors if "lora_B" in name)[0]
        tensors[key][0, 0] = value

    edit_weights(target / "adapter_model.safetensors", poison)
    return target


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_eval_refuses_a_non_finite_adapter(tiny_adapter, tiny_demo, tmp_path, capsys, value):
    bad = nan_adapter(tiny_adapter, tmp_path / "bad", value)
    out = tmp_path / "eval.json"
    code, _, stderr = run_cli_inprocess(capsys, *eval_args(bad, tiny_demo["test"], out))
    one_line_error(code, stderr, "adapter_model.safetensors", "1 weight(s) are not finite", "lora_B")
    assert not out.exists()


def test_merge_refuses_a_nan_adapter_and_writes_nothing(tiny_adapter, tmp_path, capsys):
    bad = nan_adapter(tiny_adapter, tmp_path / "bad")
    out = tmp_path / "merged"
    code, _, stderr = run_cli_inprocess(capsys, *merge_args(bad, out))
    one_line_error(code, stderr, "not finite")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("quantize", [True, False], ids=["4-bit", "no-quantize"])
def test_a_base_with_a_nan_weight_is_refused_at_load(
    tiny_adapter, tiny_demo, tiny_base_copy, tmp_path, capsys, quantize
):
    """One NaN in a 4-bit weight makes its whole dequantized matrix NaN: refused for eval and merge alike."""

    def poison(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = math.nan

    edit_weights(tiny_base_copy / "model.safetensors", poison)
    extra = ["--model", tiny_base_copy] + ([] if quantize else ["--set", "model.quantize=false"])
    for args in (
        eval_args(tiny_adapter, tiny_demo["test"], tmp_path / "e.json", *extra),
        merge_args(tiny_adapter, tmp_path / "m", *extra),
    ):
        code, _, stderr = run_cli_inprocess(capsys, *args)
        one_line_error(code, stderr, "1 weight(s) are not finite", "model.layers.0.mlp.up_proj.weight")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]


def test_merge_writes_nothing_when_a_weight_overflows_its_dtype(tiny_adapter, tiny_base_copy, tmp_path, capsys):
    """The base is finite in float32, but 1e6 is beyond float16's range: every merged weight is checked after the
    cast, before a byte is written."""

    def enlarge(tensors):
        tensors["model.norm.weight"][0] = 1e6

    edit_weights(tiny_base_copy / "model.safetensors", enlarge)
    out = tmp_path / "merged"
    args = merge_args(tiny_adapter, out, "--model", tiny_base_copy, "--dtype", "float16")
    code, _, stderr = run_cli_inprocess(capsys, *args)
    one_line_error(code, stderr, "not written", "model.norm.weight", "wider --dtype")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("diff", [math.nan, math.inf, -math.nan])
def test_the_self_check_fails_closed(tmp_path, diff):
    from dpo_cli.model.merge import check_self_check

    with pytest.raises(UserError, match="not written: the self-check"):
        check_self_check(diff, tmp_path)
    check_self_check(0.5, tmp_path)


def test_a_nan_self_check_leaves_nothing_behind(tiny_adapter, tmp_path, capsys, monkeypatch):
    """Written, then checked: a NaN difference removes the staging folder and keeps an earlier merge as it was."""
    import dpo_cli.model.merge

    monkeypatch.setattr(dpo_cli.model.merge, "merged_logit_diff", lambda *args: math.nan)
    out = tmp_path / "merged"
    code, _, stderr = run_cli_inprocess(capsys, *merge_args(tiny_adapter, out))
    one_line_error(code, stderr, "self-check", "nan")
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_checkpoint_with_a_nan_adapter(stories_model, stories_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train", "--model", stories_model, "--data", stories_data["train"], "--output-dir", out, "--max-steps", "2",
        "--batch-size", "4", "--max-length", "64", "--set", "training.save_steps=1",
        "--set", "model.gradient_checkpointing=false", "--no-quantize",
    ]  # fmt: skip
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 0, stderr
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    edit_weights(
        checkpoint / "adapter_model.safetensors",
        lambda tensors: tensors[sorted(tensors)[0]].fill_(math.inf),
    )
    metrics = (out / "metrics.jsonl").read_bytes()
    args[args.index("--max-steps") + 1] = "4"
    code, _, stderr = run_cli_inprocess(capsys, *args, "--resume")
    one_line_error(code, stderr, str(checkpoint), "not finite", "resume from the previous checkpoint")
    assert (out / "metrics.jsonl").read_bytes() == metrics


# --- JSON outputs and generation length ------------------------------------------------------------------------


def test_json_outputs_hold_no_nan_tokens(tmp_path):
    from dpo_cli.files import standard_json
    from dpo_cli.run.eval_adapter import write_jsonl

    value = {"loss": math.nan, "rows": [math.inf, -math.inf, 1.5, (2, math.nan)], "n": 3, "name": "x"}
    assert standard_json(value) == {"loss": None, "rows": [None, None, 1.5, [2, None]], "n": 3, "name": "x"}
    write_jsonl(tmp_path / "rows.jsonl", [value])
    text = (tmp_path / "rows.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard token {token}"))


def test_max_new_tokens_is_capped_at_the_context(stories_model):
    from types import SimpleNamespace

    from dpo_cli.run.generate import new_token_budget

    config = json.loads((stories_model / "config.json").read_text())
    from transformers import LlamaConfig

    model = SimpleNamespace(config=LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    assert new_token_budget(model, [12, 40], 64) == (64, None)
    budget, note = new_token_budget(model, [12, 40], 10**9)
    assert budget == 512 - 40 and "capped at 472" in note and "512-token context" in note
    with pytest.raises(UserError, match="fills the model's whole context"):
        new_token_budget(model, [600], 8)


def test_eval_generate_beyond_the_context_is_capped_and_ends(tiny_adapter, tiny_demo, tmp_path, capsys):
    """--max-new-tokens 10**6 on a 256-position model: sampling stops at the context, with one line saying so."""
    samples = tmp_path / "samples.jsonl"
    started = time.monotonic()
    code, stdout, stderr = run_cli_inprocess(
        capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--generate", "2",
        "--max-new-tokens", "1000000", "--samples", samples,
    )  # fmt: skip
    assert code == 0, stderr
    assert "--max-new-tokens 1000000: capped at" in stdout + stderr
    assert len(samples.read_text().splitlines()) == 2
    assert time.monotonic() - started < 120


@pytest.mark.parametrize(
    "change",
    [{"num_hidden_layers": "abc"}, {"model_type": {"a": 1}}, {"hidden_size": None}, {"num_attention_heads": 0}],
    ids=str,
)
@pytest.mark.parametrize("command", ["train", "data check"])
def test_a_config_transformers_cannot_read_is_one_line(stories_copy, stories_data, tmp_path, capsys, change, command):
    """The tokenizer reads config.json too (before any model): a field of the wrong type was a traceback there."""
    edit_config(stories_copy, **change)
    data = stories_data["train"]
    out = tmp_path / "run"
    args = ["train", "--model", stories_copy, "--data", data, "--output-dir", out, "--max-steps", "1"]
    if command == "data check":
        args = ["data", "check", data, "--model", stories_copy]
    code, _, stderr = run_cli_inprocess(capsys, *args)
    one_line_error(code, stderr, f"{stories_copy}/config.json: not a model config transformers can read")
    assert not out.exists()
