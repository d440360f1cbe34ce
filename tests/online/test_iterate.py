"""dpo-cli iterate on the tiny model: a run killed mid-round and resumed ends as an uninterrupted run does."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli_inprocess, run_cli_subprocess
from tests.online.test_sample import REWARD_PY  # the same reward, which can kill its process at the N-th call
from tests.run.test_from_adapter import LOG_2

# Counts its calls (one per prompt, in sampling and in eval); with KILL_AT set, SIGKILLs its process at that call.


@pytest.fixture
def setup(tiny_demo, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["One day Tom went to the park.", "At the lake, Mia"])
    )
    return {
        "model": tiny_demo["model"],
        "prompts": tiny_demo["train"],
        "reward": f"{reward}:score",
        "eval": held_out,
        "tmp": tmp_path,
    }


def iterate_args(setup, out, *extra):
    return [
        "iterate", "--model", setup["model"], "--prompts", setup["prompts"], "--reward", setup["reward"],
        "--rounds", "2", "--prompts-per-round", "3", "--num-samples", "3", "--sample-batch-size", "3",
        "--eval-prompts", setup["eval"], "--max-new-tokens", "10", "--max-steps", "2", "--batch-size", "2",
        "--lr", "5e-3", "--output-dir", out, *extra,
    ]  # fmt: skip


def pair_records(path, folder):
    """The pairs, with each source made relative to its iterate folder (the two runs live in different ones)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record["source"] = record["source"].replace(str(folder), "DIR")
    return records


def test_resume_after_sigkill_mid_round_gives_the_same_pairs_and_adapter(capsys, setup):
    whole, killed = setup["tmp"] / "whole", setup["tmp"] / "killed"
    code, out, err = run_cli_inprocess(capsys, *iterate_args(setup, whole))
    assert code == 0, err
    state = json.loads((whole / "iterate-state.json").read_text())
    assert [r["phase"] for r in state["rounds"]] == ["done", "done"]
    assert all("samples/kl" in r["eval"] for r in state["rounds"]) and (whole / "report.png").stat().st_size > 0

    # round 1: 3 sampling calls and 2 eval calls; call 7 is round 2's second prompt, after its first is on disk
    env = {"CALLS_FILE": str(setup["tmp"] / "calls"), "KILL_AT": "7"}
    os.environ.update(env)
    try:
        result = run_cli_subprocess(*iterate_args(setup, killed))
    finally:
        for key in env:
            os.environ.pop(key)
    assert result.returncode == -signal.SIGKILL
    state = json.loads((killed / "iterate-state.json").read_text())
    assert [r["phase"] for r in state["rounds"]] == ["done", "sample"]

    refused = run_cli_subprocess(*iterate_args(setup, killed))
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr
    result = run_cli_subprocess(*iterate_args(setup, killed, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "round 2: continued after 1 prompts" in result.stdout
    for number in ("01", "02"):
        pairs = f"round-{number}/samples/pairs.jsonl"
        assert pair_records(killed / pairs, killed) == pair_records(whole / pairs, whole)
    final = "round-02/run/adapter_model.safetensors"
    got, expected = load_file(killed / final), load_file(whole / final)
    assert got.keys() == expected.keys()
    for name in expected:
        assert (got[name] == expected[name]).all(), name


def test_resume_after_sigkill_mid_training_gives_the_same_adapter(capsys, setup):
    """Killed once round 2's training has saved a checkpoint (in a later step, its save, or the round's eval: where
    the kill lands is the scheduler's), `--resume` ends on the uninterrupted run's adapter."""
    whole, killed = setup["tmp"] / "whole", setup["tmp"] / "killed"
    longer = ("--max-steps", "4", "--set", "training.save_steps=1")
    code, _, err = run_cli_inprocess(capsys, *iterate_args(setup, whole, *longer))
    assert code == 0, err

    command = [sys.executable, "-m", "dpo_cli", *map(str, iterate_args(setup, killed, *longer))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    first_checkpoint = killed / "round-02" / "run" / "checkpoints" / "step-000001"
    while run.poll() is None and not first_checkpoint.is_dir():
        time.sleep(0.01)
    assert run.poll() is None, "the run ended before round 2 trained; make it longer"
    run.kill()
    run.communicate(timeout=60)
    phase = json.loads((killed / "iterate-state.json").read_text())["rounds"][1]["phase"]
    assert phase in ("train", "eval"), phase

    result = run_cli_subprocess(*iterate_args(setup, killed, *longer, "--resume"))
    assert result.returncode == 0, result.stderr
    if phase == "train":  # continued from the checkpoint, not trained again from the round's start
        assert "resuming from" in result.stdout and "round-02" in result.stdout, result.stdout
    metrics = (killed / "round-02" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics if '"loss"' in line] == [1, 2, 3, 4]
    final = "round-02/run/adapter_model.safetensors"
    got, expected = load_file(killed / final), load_file(whole / final)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-8)  # as train's own resume test


def test_a_reward_named_only_in_the_recipe_is_not_run(capsys, setup, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"reward: {setup['reward']}\nmodel:\n  path: {setup['model']}\n")
    args = iterate_args(setup, tmp_path / "out")
    args.insert(1, str(recipe))
    at = args.index("--reward")
    del args[at : at + 2]
    code, _, err = run_cli_inprocess(capsys, *args)
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip() == (
        f"error: {recipe}: names the reward {setup['reward']!r}; a reward is code and runs only when named on the "
        "command line: pass --reward SPEC if you trust it"
    )


def _first_loss(run_dir) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(record["loss"] for record in records if "loss" in record)


def test_reference_initial_keeps_round_ones_reference(capsys, setup, tmp_path):
    """--reference initial from an adapter: round 2 starts from round 1's adapter and refers to the starting one
    (its reference-adapter/ is that adapter, byte for byte), so its step 1 is not log 2; from the base, round 2
    refers to the bare base. A --resume that changes --reference is one line."""
    from dpo_cli.config import LoraSection
    from dpo_cli.model.reference_adapter import adapter_content_sha256
    from tests.run.test_from_adapter import make_adapter

    lora = LoraSection(target_modules=["q_proj", "v_proj"])
    start = make_adapter(setup["model"], tmp_path / "start", lora)
    out = tmp_path / "initial"
    targets = "--set", "lora.target_modules=[q_proj, v_proj]"
    args = iterate_args(setup, out, "--reference", "initial", "--set", f"model.from_adapter={start}", *targets)
    code, _, err = run_cli_inprocess(capsys, *args)
    assert code == 0, err
    for number in ("01", "02"):
        assert adapter_content_sha256(out / f"round-{number}" / "run" / "reference-adapter") == (
            adapter_content_sha256(start)
        )
    assert _first_loss(out / "round-01" / "run") == pytest.approx(LOG_2, abs=1e-6)
    assert abs(_first_loss(out / "round-02" / "run") - LOG_2) > 1e-4, "round 2's policy is not its reference"

    refused = run_cli_inprocess(capsys, *iterate_args(setup, out, "--reference", "previous", "--resume", *args[-4:]))
    assert refused[0] == 2 and len(refused[2].strip().splitlines()) == 1, refused[2]
    assert "--resume: reference was 'initial'" in refused[2]

    from_base = tmp_path / "from-base"
    code, _, err = run_cli_inprocess(capsys, *iterate_args(setup, from_base, "--reference", "initial"))
    assert code == 0, err
    round_two = from_base / "round-02" / "run"
    assert not (round_two / "reference-adapter").exists()
    assert "reference_adapter: base" in (round_two / "recipe.yaml").read_text()
    assert abs(_first_loss(round_two) - LOG_2) > 1e-4


def test_an_unknown_reference_is_one_line(capsys, setup, tmp_path):
    code, _, err = run_cli_inprocess(capsys, *iterate_args(setup, tmp_path / "out", "--reference", "first"))
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip() == "error: --reference 'first': must be one of previous, initial"


def test_a_state_file_from_before_reference_resumes_as_previous(tmp_path):
    """State files written before --reference existed hold no `reference`: they ran `previous`, and resume so."""
    from dpo_cli.errors import UserError
    from dpo_cli.online.iterate import STATE, IterateOptions, _start_state

    options = IterateOptions(recipe=None, prompts=[tmp_path / "p.jsonl"], rewards=["r.py:f"], output_dir=tmp_path,
                             rounds=2, resume=True)  # fmt: skip
    settings = options.settings()
    assert settings["reference"] == "previous" and settings["sample_batch_size"] == 32
    del settings["reference"]
    (tmp_path / STATE).write_text(json.dumps({"settings": settings, "rounds": []}))
    assert _start_state(tmp_path, options)["settings"]["reference"] == "previous"
    (tmp_path / STATE).write_text(json.dumps({"settings": settings, "rounds": []}))
    with pytest.raises(UserError, match="--resume: reference was 'previous'.*asks for 'initial'"):
        _start_state(tmp_path, dataclasses.replace(options, reference="initial"))
