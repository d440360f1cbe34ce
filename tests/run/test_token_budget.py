"""--max-tokens-per-batch: micro-batches of similar-length pairs under a token budget, in a seeded order that resume
replays, and a loss that stays the mean over the pairs of a step however they are grouped."""

from __future__ import annotations

import pytest
import torch

from dpo_cli.dpo.layouts import token_budget_batches
from dpo_cli.run.objective import tokens_per_pair
from dpo_cli.run.setup import DataStream
from tests.conftest import run_cli_inprocess


def test_budget_batches_by_hand():
    # Shortest first: 3+4 = 7 fits 10, +5 would not; 5 then 9 would not; 20 is over the budget and goes alone.
    assert token_budget_batches([5, 3, 9, 4, 20], max_tokens=10) == [[1, 3], [0], [2], [4]]
    assert token_budget_batches([2, 2, 2, 2], max_tokens=4) == [[0, 1], [2, 3]]
    assert token_budget_batches([], max_tokens=4) == []


def test_budget_stream_visits_every_pair_once_per_epoch_in_a_seeded_order():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 200, (50,), generator=generator).tolist()
    batches = token_budget_batches(tokens, max_tokens=600)
    assert all(sum(tokens[i] for i in batch) <= 600 for batch in batches)
    stream = DataStream(num_pairs=50, batch_size=4, seed=3, budget_batches=batches)
    assert stream.per_epoch == len(batches)
    epoch0 = [stream.indices(m) for m in range(stream.per_epoch)]
    epoch1 = [stream.indices(m) for m in range(stream.per_epoch, 2 * stream.per_epoch)]
    assert sorted(i for b in epoch0 for i in b) == sorted(i for b in epoch1 for i in b) == list(range(50))
    assert epoch0 != epoch1, "each epoch orders the micro-batches anew"
    again = DataStream(50, 4, 3, token_budget_batches(tokens, 600))
    assert [again.indices(m) for m in range(2 * stream.per_epoch)] == epoch0 + epoch1, "a function of the data"


def test_tokens_per_pair_reads_the_selected_rows():
    from datasets import Dataset

    rows = {"prompt_ids": [[1, 2], [3], [4, 5, 6]], "chosen_ids": [[7], [8, 9], [1]], "rejected_ids": [[2], [3], []]}
    pairs = Dataset.from_dict(rows).select([2, 0])  # an indices mapping, as tokenization's kept rows have
    assert tokens_per_pair(pairs) == [2 * 3 + 1 + 0, 2 * 2 + 1 + 1]


def _budget_args(tiny_demo, out, steps=6):
    return (
        "train", "--model", tiny_demo["model"], "--data", tiny_demo["train"], "--output-dir", out,
        "--max-steps", steps, "--max-tokens-per-batch", 300, "--grad-accum", 2, "--lr", 3e-3,
        "--set", "training.save_steps=3", "--set", "model.gradient_checkpointing=false",
    )  # fmt: skip


def test_budget_run_resumes_exactly(tiny_demo, tmp_path, capsys, monkeypatch):
    from dpo_cli.run.loop import step_batches
    from tests.run.extra_callbacks import InterruptBefore, add_callback
    from tests.run.test_train_e2e import _train_records

    straight = tmp_path / "straight"
    assert run_cli_inprocess(capsys, *_budget_args(tiny_demo, straight))[0] == 0
    interrupted = tmp_path / "interrupted"
    seen_sizes = []

    class NoteSizes(InterruptBefore):
        def on_step_begin(self, run):
            super().on_step_begin(run)
            seen_sizes.extend(len(batch) for batch in step_batches(run))

    with pytest.MonkeyPatch.context() as patch:
        add_callback(patch, NoteSizes(step=3))
        assert run_cli_inprocess(capsys, *_budget_args(tiny_demo, interrupted))[0] == 130
    code, _, stderr = run_cli_inprocess(capsys, *_budget_args(tiny_demo, interrupted), "--resume")
    assert code == 0, stderr
    assert len(set(seen_sizes)) > 1, "micro-batches of different pair counts, so the grouping is exercised"

    expected, resumed = _train_records(straight), _train_records(interrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "num_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)


def test_the_step_loss_is_the_mean_over_its_pairs_however_they_are_grouped(tiny_demo, tmp_path):
    from rich.console import Console

    from dpo_cli.config import recipe_from_dict
    from dpo_cli.run.loop import train_step
    from dpo_cli.run.setup import build_run

    def step_with(groups, name):
        recipe = recipe_from_dict(
            {
                "model": {"path": str(tiny_demo["model"]), "gradient_checkpointing": False},
                "data": {"train": [str(tiny_demo["train"])]},
                "training": {"output_dir": str(tmp_path / name), "max_steps": 1, "grad_accum": len(groups)},
            }
        )
        run = build_run(recipe, console=Console(quiet=True))
        record = train_step(run, groups)
        adapter = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        return record, adapter

    pairs = [0, 1, 2, 3, 4, 5, 6]
    one, one_adapter = step_with([pairs], "one")
    uneven, uneven_adapter = step_with([pairs[:1], pairs[1:5], pairs[5:]], "uneven")
    for key in ("loss", "rewards/chosen", "logps/rejected", "grad_norm", "num_tokens"):
        assert uneven[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    for name, value in one_adapter.items():
        torch.testing.assert_close(uneven_adapter[name], value, rtol=1e-5, atol=1e-7, msg=name)
