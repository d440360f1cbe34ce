"""dpo-cli sample end to end on the tiny model: deterministic, independent of batching, resumable after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal

import pytest

from dpo_cli.data.records import read_jsonl
from dpo_cli.online.sample import read_candidates
from tests.conftest import run_cli_inprocess, run_cli_subprocess

# The reward counts its calls (one per prompt) in a file; with KILL_AT set it SIGKILLs its own process at that call,
# which is a kill in the middle of sampling, after the earlier batches were written.
REWARD_PY = """
import os, signal
from dpo_cli.demo.tiny import happy_score

def score(prompts, completions, **columns):
    calls = os.environ.get("CALLS_FILE")
    if calls:
        with open(calls, "a") as handle:
            handle.write("x")
        if os.path.getsize(calls) == int(os.environ.get("KILL_AT", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
    return [float(happy_score(c) + 0.01 * len(c)) for c in completions]
"""


@pytest.fixture
def setup(untrained_tiny, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    prompts = tmp_path / "prompts.jsonl"
    texts = ["One day Tom went to the park.", "At the lake, Mia", "Sue walked to school after lunch.", "Ben", "Lily"]
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts + ["At the beach, Sam"]))
    return {"model": untrained_tiny["model"], "reward": f"{reward}:score", "prompts": prompts, "tmp": tmp_path}


def sample_args(setup, out, *extra):
    return [
        "sample", "--model", setup["model"], "--prompts", setup["prompts"], "--reward", setup["reward"],
        "--num-samples", "3", "--max-new-tokens", "6", "--seed", "5", "--output-dir", out, *extra,
    ]  # fmt: skip


def candidates(folder):
    rows = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
    return sorted((row["prompt_number"], row["sample"], row["completion"], row["reward"]) for row in rows)


def test_the_same_samples_whatever_the_batch_size_and_pairs_train_can_read(capsys, setup):
    a, b = setup["tmp"] / "a", setup["tmp"] / "b"
    code, out, err = run_cli_inprocess(capsys, *sample_args(setup, a, "--batch-size", "32"))
    assert code == 0, err
    assert "prompts with no usable pair" in out
    code, _, err = run_cli_inprocess(capsys, *sample_args(setup, b, "--batch-size", "3"))
    assert code == 0, err
    assert candidates(a) == candidates(b)
    assert len(candidates(a)) == 18
    assert (a / "pairs.jsonl").read_text() == (b / "pairs.jsonl").read_text()
    pairs = list(read_jsonl(a / "pairs.jsonl"))  # the explicit format train reads, every record valid
    summary = json.loads((a / "summary.json").read_text())
    assert len(pairs) == summary["pairs"] > 0
    assert summary["pairs"] + summary["prompts_without_pair"] == 6
    by_prompt = {}
    for number, _, completion, reward in candidates(a):
        by_prompt.setdefault(number, []).append((reward, completion))
    for pair in pairs:  # max-min: chosen is a best sample, rejected a worst one, of that prompt
        number = int(pair.source.rsplit(":", 1)[1]) - 1
        rewards = dict((c, r) for r, c in by_prompt[number])
        assert rewards[pair.chosen] == max(rewards.values()) and rewards[pair.rejected] == min(rewards.values())


def test_another_seed_gives_other_samples(capsys, setup):
    a, b = setup["tmp"] / "a", setup["tmp"] / "b"
    assert run_cli_inprocess(capsys, *sample_args(setup, a))[0] == 0
    assert run_cli_inprocess(capsys, *sample_args(setup, b, "--seed", "6"))[0] == 0
    assert [row[2] for row in candidates(a)] != [row[2] for row in candidates(b)]


def test_resume_after_sigkill_mid_sampling_gives_the_same_pairs(capsys, setup):
    whole, killed = setup["tmp"] / "whole", setup["tmp"] / "killed"
    assert run_cli_inprocess(capsys, *sample_args(setup, whole, "--batch-size", "6"))[0] == 0  # 2 prompts a batch
    calls = setup["tmp"] / "calls"
    env = {"CALLS_FILE": str(calls), "KILL_AT": "4"}  # the 2nd prompt of the 2nd batch: batch 1 is on disk
    os.environ.update(env)
    try:
        result = run_cli_subprocess(*sample_args(setup, killed, "--batch-size", "6"))
    finally:
        for key in env:
            os.environ.pop(key)
    assert result.returncode == -signal.SIGKILL
    assert len(candidates(killed)) == 6 and not (killed / "pairs.jsonl").exists()
    result = run_cli_subprocess(*sample_args(setup, killed, "--batch-size", "6"))
    assert result.returncode == 0, result.stderr
    assert "continued after 2 prompts" in result.stdout
    assert candidates(killed) == candidates(whole)
    assert (killed / "pairs.jsonl").read_text() == (whole / "pairs.jsonl").read_text()


def test_a_rerun_repairs_without_sampling_and_other_settings_are_refused(capsys, setup):
    out = setup["tmp"] / "out"
    assert run_cli_inprocess(capsys, *sample_args(setup, out))[0] == 0
    code, stdout, _ = run_cli_inprocess(capsys, *sample_args(setup, out, "--pairing", "all"))
    assert code == 0 and "continued after 6 prompts" in stdout
    assert json.loads((out / "summary.json").read_text())["pairing"] == "all"
    code, _, err = run_cli_inprocess(capsys, *sample_args(setup, out, "--temperature", "0.7"))
    assert code == 2
    assert err.strip() == (
        f"error: --output-dir {out}: holds samples with temperature=1.0, and this run asks for 0.7; rerun with the "
        "same settings to continue, or pick another folder"
    )


def test_a_torn_last_line_and_a_partial_prompt_are_cut_off(tmp_path):
    path = tmp_path / "candidates.jsonl"
    rows = [{"prompt_number": p, "sample": s} for p in (0, 1) for s in (0, 1)] + [{"prompt_number": 2, "sample": 0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"prompt_number": 2, "sam')
    assert read_candidates(path, 2) == rows[:4]
    assert path.read_text() == "".join(json.dumps(row) + "\n" for row in rows[:4])


def test_prompts_from_a_pair_file_are_its_distinct_prompts(capsys, setup, untrained_tiny):
    out = setup["tmp"] / "from-pairs"
    args = sample_args(setup, out)
    args[args.index("--prompts") + 1] = untrained_tiny["test"]
    assert run_cli_inprocess(capsys, *args)[0] == 0
    distinct = {pair.prompt for pair in read_jsonl(untrained_tiny["test"])}
    assert json.loads((out / "summary.json").read_text())["prompts"] == len(distinct)


def test_conversations_without_a_chat_template_are_one_line(capsys, setup):
    chat = setup["tmp"] / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "Tell me a story."}]}) + "\n")
    args = sample_args(setup, setup["tmp"] / "out")
    args[args.index("--prompts") + 1] = chat
    code, _, err = run_cli_inprocess(capsys, *args)
    assert code == 2 and err.strip().endswith("has no chat template to render them; pass --chat-template FILE.jinja")
    assert not (setup["tmp"] / "out").exists()
