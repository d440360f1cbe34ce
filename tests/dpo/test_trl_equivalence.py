"""Our tokenization, loss, rewards and log-probs equal TRL 1.16's DPOTrainer on the same model, adapter and batch."""

from __future__ import annotations

import pytest
import torch

from dpo_cli.config import DpoSection, ModelSection
from dpo_cli.data.records import read_jsonl
from dpo_cli.data.tokenize import tokenize_pairs
from dpo_cli.dpo.layouts import collate_padded
from dpo_cli.dpo.scoring import score_batch
from dpo_cli.model.load import load_base_model, load_tokenizer, scoring_model
from tests.trl_oracle import load_records, make_trl_trainer, trl_batch, trl_train_metrics

PAIRS = 6
MAX_LENGTH = 48  # short enough that some stories-happy completions are cut, so truncation is compared too


def _compare(model_path, data_path, tmp_path, beta=0.1):
    tokenizer = load_tokenizer(str(model_path))
    model = load_base_model(ModelSection(path=str(model_path), gradient_checkpointing=False), torch.device("cpu"))
    records = load_records(data_path, PAIRS)
    trainer = make_trl_trainer(model, tokenizer, records, tmp_path, max_length=MAX_LENGTH, beta=beta)
    policy = trainer.model
    trl_loss, trl_metrics = trl_train_metrics(trainer, policy, trl_batch(trainer, PAIRS))

    pairs, _ = tokenize_pairs(tokenizer, list(read_jsonl(data_path))[:PAIRS], MAX_LENGTH)
    batch = collate_padded(pairs, tokenizer.pad_token_id)
    trl_rows = trl_batch(trainer, PAIRS)
    assert torch.equal(batch.input_ids, trl_rows["input_ids"]), "token ids must equal TRL's after its truncation"
    scores = score_batch(scoring_model(policy), batch, DpoSection(beta=beta))

    ours = {
        "loss": scores.loss.item(),
        "rewards/chosen": scores.chosen_rewards.mean().item(),
        "rewards/rejected": scores.rejected_rewards.mean().item(),
        "rewards/accuracies": (scores.chosen_rewards > scores.rejected_rewards).float().mean().item(),
        "rewards/margins": (scores.chosen_rewards - scores.rejected_rewards).mean().item(),
        "logps/chosen": scores.logps.chosen.mean().item(),
        "logps/rejected": scores.logps.rejected.mean().item(),
    }
    assert ours["loss"] == pytest.approx(trl_loss.item(), rel=1e-5)
    for key, value in ours.items():
        if key != "loss":
            assert value == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    # The rewards must not be trivially zero: the random adapter makes policy and reference differ.
    assert abs(ours["rewards/margins"]) > 1e-3
    return scores, trl_loss, policy


def test_tiny_model_equals_trl(tiny_demo, tmp_path):
    _compare(tiny_demo["model"], tiny_demo["train"], tmp_path)


def test_tiny_model_equals_trl_with_another_beta(tiny_demo, tmp_path):
    _compare(tiny_demo["model"], tiny_demo["train"], tmp_path, beta=0.3)


def test_cdpo_label_smoothing_by_hand():
    """TRL 1.16's `sigmoid` ignores label_smoothing; ours is cDPO, so it is checked against a hand-worked value.

    log-ratios: chosen -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5, so Δ = 1. With β = 1, ε = 0.1:
    loss = -0.9 log σ(1) - 0.1 log σ(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617.
    """
    from dpo_cli.dpo.losses import LossOptions, PairLogps, sigmoid_loss

    logps = PairLogps(*(torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5)))
    assert sigmoid_loss(logps, LossOptions(beta=1.0, label_smoothing=0.1)).item() == pytest.approx(0.4132617, abs=1e-6)
    assert sigmoid_loss(logps, LossOptions(beta=1.0)).item() == pytest.approx(0.3132617, abs=1e-6)


def test_stories260k_4bit_equals_trl_including_gradients(stories_model, stories_data, tmp_path):
    scores, trl_loss, policy = _compare(stories_model, stories_data["train"], tmp_path)
    assert any("Linear4bit" in type(m).__name__ for m in policy.modules()), "the base must be 4-bit"
    params = [p for p in policy.parameters() if p.requires_grad]
    ours = torch.autograd.grad(scores.loss, params, retain_graph=False)
    theirs = torch.autograd.grad(trl_loss, params)
    for mine, trl in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, trl, rtol=1e-4, atol=1e-6)


def test_tokenization_equals_trl_on_stories(stories_model, stories_data, tmp_path):
    """Every stories-happy test pair tokenizes to TRL's prompt/chosen/rejected ids (before TRL's collator cut)."""
    from datasets import Dataset

    tokenizer = load_tokenizer(str(stories_model))
    records = load_records(stories_data["test"], 10_000)
    model = load_base_model(ModelSection(path=str(stories_model)), torch.device("cpu"))
    trainer = make_trl_trainer(model, tokenizer, records[:2], tmp_path, max_length=None)
    theirs = trainer._prepare_dataset(Dataset.from_list(records), tokenizer, trainer.args, "check")
    ours, summary = tokenize_pairs(tokenizer, list(read_jsonl(stories_data["test"])), max_length=10_000)
    assert summary.kept == len(theirs) == len(records)
    for mine, trl in zip(ours, theirs, strict=True):
        assert mine.prompt_ids == trl["prompt_ids"]
        assert mine.chosen_ids == trl["chosen_ids"]
        assert mine.rejected_ids == trl["rejected_ids"]


def test_pairs_whose_prompt_fills_max_length_are_dropped_and_counted(stories_model, stories_data):
    tokenizer = load_tokenizer(str(stories_model))
    pairs = list(read_jsonl(stories_data["train"]))[:20]
    prompt_lengths = [len(tokenizer(p.prompt)["input_ids"]) for p in pairs]
    limit = sorted(prompt_lengths)[len(prompt_lengths) // 2]
    kept, summary = tokenize_pairs(tokenizer, pairs, max_length=limit)
    dropped = [p.source for p, n in zip(pairs, prompt_lengths, strict=True) if n >= limit]
    assert dropped and summary.dropped_long_prompt == dropped
    assert summary.kept == len(kept) == len(pairs) - len(dropped)
    assert all(len(k.prompt_ids) + len(k.chosen_ids) <= limit for k in kept)
