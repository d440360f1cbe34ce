"""eval --reward --generate: the sampled KL, rewards and win rate equal a direct computation with the models."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from dpo_cli.demo.tiny import happy_score
from dpo_cli.model.adapter import load_base_tokenizer, load_policy, open_adapter
from dpo_cli.online.generation import SamplingSettings, generate_rows, sample_seed
from dpo_cli.online.policy_eval import evaluate_samples, sample_metrics
from dpo_cli.online.prompts import read_prompts
from dpo_cli.online.rewards import load_rewards
from tests.conftest import run_cli_inprocess

REWARD_PY = "from dpo_cli.demo.tiny import happy_score\n\ndef score(prompts, completions, **kw):\n"
REWARD_PY += "    return [float(happy_score(c)) for c in completions]\n"


def direct_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt), one unpadded sequence through the model's own forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logps[len(prompt_ids) - 1 + t, token]) for t, token in enumerate(completion_ids))


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "happy.py"
    path.write_text(REWARD_PY)
    return path


def test_kl_and_win_rate_equal_a_direct_computation(tiny_adapter, tiny_demo, reward_file):
    adapter = open_adapter(tiny_adapter)
    tokenizer = load_base_tokenizer(adapter)
    model = load_policy(adapter)
    prompts = read_prompts([str(tiny_demo["test"])], adapter.recipe.data)[:6]
    rewards = load_rewards([f"{reward_file}:score"])
    results = evaluate_samples(model, tokenizer, prompts, rewards, max_new_tokens=12, seed=3, batch_size=4)
    metrics = sample_metrics(results, beta=0.1)

    log_ratios, wins = [], []
    for result in results:
        policy = direct_logp(model, result.prompt_ids, result.policy_ids)
        with model.disable_adapter():
            reference = direct_logp(model, result.prompt_ids, result.policy_ids)
        assert result.logp_policy == pytest.approx(policy, abs=1e-4)
        assert result.logp_reference == pytest.approx(reference, abs=1e-4)
        log_ratios.append(policy - reference)
        mine, theirs = happy_score(result.policy_text), happy_score(result.reference_text)
        assert (result.reward_policy, result.reward_reference) == (mine, theirs)
        wins.append(1.0 if mine > theirs else 0.5 if mine == theirs else 0.0)
        # the policy's sample is the one its own seed draws from the policy alone, unbatched; the reference's from
        # the reference under the same seed
        settings = SamplingSettings(1, 12, 1.0, 1.0, 3)
        seed = [sample_seed(3, result.number, 0)]
        alone = generate_rows(model, [result.prompt_ids], seed, [12], settings, tokenizer.pad_token_id, {2})
        assert alone[0].token_ids == result.policy_ids
        with model.disable_adapter():
            alone = generate_rows(model, [result.prompt_ids], seed, [12], settings, tokenizer.pad_token_id, {2})
        assert alone[0].token_ids == result.reference_ids
    assert metrics["samples/kl"] == pytest.approx(statistics.fmean(log_ratios), abs=1e-4)
    assert metrics["samples/win_rate"] == pytest.approx(statistics.fmean(wins))
    assert metrics["samples/objective"] == pytest.approx(metrics["samples/reward_policy"] - 0.1 * metrics["samples/kl"])
    assert any(r.policy_ids != r.reference_ids for r in results)  # the adapter changed something


def test_eval_reward_through_the_command_line(capsys, tiny_adapter, tiny_demo, reward_file, tmp_path):
    output, per_example, samples = tmp_path / "eval.json", tmp_path / "pairs.jsonl", tmp_path / "samples.jsonl"
    code, out, err = run_cli_inprocess(
        capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--generate", "5",
        "--max-new-tokens", "10", "--reward", f"{reward_file}:score", "--output", output,
        "--per-example", per_example, "--samples", samples,
    )  # fmt: skip
    assert code == 0, err
    for name in ("samples/reward_policy", "samples/reward_reference", "samples/win_rate", "samples/kl"):
        assert name in out
    metrics = json.loads(output.read_text())["metrics"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == metrics["samples/prompts"] == 5
    assert metrics["samples/kl"] == pytest.approx(statistics.fmean(row["log_ratio"] for row in rows))
    assert metrics["samples/reward_policy"] == pytest.approx(statistics.fmean(row["reward_policy"] for row in rows))
    joined = [json.loads(line) for line in per_example.read_text().splitlines()]
    assert sum("sample_log_ratio" in row for row in joined) == 5


def test_reward_without_generate_is_one_line(capsys, tiny_adapter, tiny_demo, reward_file):
    code, _, err = run_cli_inprocess(
        capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--reward", f"{reward_file}:score"
    )
    assert (
        code == 2
        and err.strip() == "error: --reward scores samples: pass --generate N, the number of prompts to sample"
    )
