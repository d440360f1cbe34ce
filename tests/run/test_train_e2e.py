"""`dpo-cli train` end to end, as a user runs it: learning, outputs, resume, interruption, divergence, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dpo_cli.config import load_recipe
from tests.conftest import run_cli_inprocess, run_cli_subprocess


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _train_records(output_dir):
    return [r for r in _records(output_dir) if "loss" in r]


@pytest.mark.slow
def test_stories260k_4bit_learns_the_happy_preference(stories_model, stories_data, tmp_path, capsys):
    from peft import PeftModel

    from dpo_cli.config import ModelSection
    from dpo_cli.data.records import read_jsonl
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.dpo.layouts import collate_padded
    from dpo_cli.dpo.scoring import policy_logps
    from dpo_cli.model.load import load_base_model, load_tokenizer, scoring_model

    out = tmp_path / "run"
    base_before = load_file(str(stories_model / "model.safetensors"))
    code, stdout, stderr = run_cli_inprocess(
        capsys,
        "train",
        "--model", stories_model,
        "--data", stories_data["train"],
        "--output-dir", out,
        "--max-steps", 36,
        "--batch-size", 8,
        "--lr", 2e-3,
        "--max-length", 128,
        "--set", "training.save_steps=0",
    )  # fmt: skip
    assert code == 0, stderr
    assert "done: 36 steps" in stdout

    # The outputs: a standard PEFT adapter folder, the tokenizer, the resolved recipe, one metrics line per step.
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.model.path == str(stories_model) and recipe.model.quantize and recipe.training.max_steps == 36
    records = _train_records(out)
    assert [r["step"] for r in records] == list(range(1, 37))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in records[0]
    assert records[0]["loss"] == pytest.approx(0.693147, abs=1e-4), "policy = reference at step 1"

    # It learned: the loss fell and the train reward accuracy rose well above chance.
    first, last = records[:6], records[-12:]
    assert sum(r["loss"] for r in last) / len(last) < sum(r["loss"] for r in first) / len(first) - 0.1
    assert sum(r["rewards/accuracies"] for r in last) / len(last) > 0.75

    # The base weights on disk are untouched; the adapter moved away from its zero-initialised B.
    assert all(torch.equal(base_before[k], v) for k, v in load_file(str(stories_model / "model.safetensors")).items())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())

    # The saved adapter reloads with plain PEFT on a fresh 4-bit base and gives the same log-probs it trained to.
    tokenizer = load_tokenizer(str(out))
    pairs, _ = tokenize_pairs(tokenizer, list(read_jsonl(stories_data["test"]))[:4], 128)
    batch = collate_padded(pairs, tokenizer.pad_token_id)
    base = load_base_model(ModelSection(path=str(stories_model)), torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        with_adapter = policy_logps(scoring_model(reloaded), batch).sums
        with reloaded.disable_adapter():
            without = policy_logps(scoring_model(reloaded), batch).sums
    assert not torch.allclose(with_adapter, without, atol=1e-3)
    # Same weights, same data: the in-memory policy of the run is what the folder holds.
    base2 = load_base_model(ModelSection(path=str(stories_model)), torch.device("cpu"))
    again = PeftModel.from_pretrained(base2, str(out))
    with torch.no_grad():
        torch.testing.assert_close(policy_logps(scoring_model(again), batch).sums, with_adapter)


def _tiny_args(tiny_demo, out, steps=6, *extra):
    return (
        "train",
        "--model", tiny_demo["model"],
        "--data", tiny_demo["train"],
        "--output-dir", out,
        "--max-steps", steps,
        "--batch-size", 4,
        "--grad-accum", 2,
        "--lr", 3e-3,
        "--set", "training.save_steps=2",
        *extra,
    )  # fmt: skip


def test_resume_after_interrupt_equals_uninterrupted(tiny_demo, tmp_path, capsys, monkeypatch):
    from tests.run.extra_callbacks import InterruptBefore, add_callback

    straight = tmp_path / "straight"
    assert run_cli_inprocess(capsys, *_tiny_args(tiny_demo, straight))[0] == 0

    # Ctrl-C during step 4: the run saves a checkpoint at step 3 (its last complete step) and exits cleanly.
    interrupted = tmp_path / "interrupted"
    with pytest.MonkeyPatch.context() as patch:
        add_callback(patch, InterruptBefore(step=3))
        code, _, stderr = run_cli_inprocess(capsys, *_tiny_args(tiny_demo, interrupted))
    assert code == 130 and "interrupted at step 3" in stderr and "--resume" in stderr
    assert (interrupted / "checkpoints" / "step-000003").is_dir()
    assert not (interrupted / "adapter_model.safetensors").exists(), "no final adapter from an interrupted run"

    # Without --resume the folder is refused, with it the run continues from step 3.
    code, _, stderr = run_cli_inprocess(capsys, *_tiny_args(tiny_demo, interrupted))
    assert code != 0 and "--resume" in stderr
    code, stdout, stderr = run_cli_inprocess(capsys, *_tiny_args(tiny_demo, interrupted), "--resume")
    assert code == 0, stderr
    assert "resuming from" in stdout

    expected, resumed = _train_records(straight), _train_records(interrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    final_a = load_file(str(straight / "adapter_model.safetensors"))
    final_b = load_file(str(interrupted / "adapter_model.safetensors"))
    for key, value in final_a.items():
        torch.testing.assert_close(final_b[key], value, rtol=1e-6, atol=1e-8)
    # Old checkpoints are pruned to save_total_limit (2).
    assert [p.name for p in sorted((interrupted / "checkpoints").iterdir())] == ["step-000004", "step-000006"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tiny_demo, tmp_path, capsys, monkeypatch
):
    from dpo_cli.run import objective as train_module  # the DPO objective scores the steps' batches

    original = train_module.score_batch
    calls = {"n": 0}

    def poisoned(model, batch, dpo, ref_logps=None):
        scores = original(model, batch, dpo, ref_logps)
        calls["n"] += 1
        if calls["n"] > 4:  # step 3 (two micro-batches a step)
            scores.losses = scores.losses * float("nan")
        return scores

    monkeypatch.setattr(train_module, "score_batch", poisoned)
    out = tmp_path / "nan"
    code, _, stderr = run_cli_inprocess(capsys, *_tiny_args(tiny_demo, out))
    assert code == 3
    assert stderr.strip().startswith("error: step 3: the loss is nan") and len(stderr.strip().splitlines()) == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert [r["step"] for r in _train_records(out)] == [1, 2]


def test_bad_inputs_end_in_one_line_without_traceback(tiny_demo, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("training:\n  lerning_rate: 0.1\n")
    malformed = tmp_path / "bad.jsonl"
    good = tiny_demo["train"].read_text().splitlines()[0]
    malformed.write_text(good + "\n" + '{"prompt": "a", "chosen": "b",\n')
    cases = [
        (("train", recipe), "unknown recipe key training.lerning_rate"),
        (_tiny_args(tiny_demo, tmp_path / "o1")[:2] + ("--data", tmp_path / "missing.jsonl"), "file not found"),
        (
            ("train", "--model", tiny_demo["model"], "--data", malformed, "--output-dir", tmp_path / "o2"),
            f"{malformed}:2: invalid JSON",
        ),
    ]
    for args, message in cases:
        result = run_cli_subprocess(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "o2").exists(), "nothing is written when the data is bad"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--batch-size", 0), "training.batch_size: 0 must be positive"),
        (("--set", "lora.rank=8"), "unknown recipe key lora.rank"),
        (("--model", "/nonexistent/model"), "not a model folder"),
        (("--max-length", 1), "fills max_length=1"),
    ],
)
def test_more_bad_inputs_in_process(tiny_demo, tmp_path, capsys, extra, message):
    code, _, stderr = run_cli_inprocess(capsys, *_tiny_args(tiny_demo, tmp_path / "o"), *extra)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
