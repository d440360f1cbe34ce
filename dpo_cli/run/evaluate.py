"""Preference metrics of a policy against its reference over held-out pairs, without gradients.

Used by `dpo-cli train` for its eval steps and by `dpo-cli eval`. Metrics are per-pair means over the whole data
set, with TRL's names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

from dpo_cli.config import DpoSection
from dpo_cli.dpo.scoring import score_batch, scored_batches
from dpo_cli.model.load import scoring_model
from dpo_cli.run.distributed import sum_over_ranks
from dpo_cli.run.metrics import PairMetrics


def evaluate_pairs(
    model,
    pairs: Sequence,
    pad_token_id: int,
    dpo: DpoSection,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    per_pair: list[dict] | None = None,
    layout: str = "padded",
    ref_logps: torch.Tensor | None = None,
    min_batches: int = 0,
    filler=None,
) -> dict[str, float]:
    """Metrics over `pairs`; with `per_pair` a list, one row per pair (rewards, margin, ranked right) is appended.
    `ref_logps` (num_pairs, 2), the pairs' reference log-probs (run/reference.py), replaces the reference pass.
    `min_batches`: after `pairs`, the pair `filler` is scored alone until that many batches ran, and not counted
    (a sharded model's forward is a collective: every process must run as many)."""
    device = next(model.parameters()).device
    scoring = scoring_model(model)
    was_training = model.training
    model.eval()
    metrics = PairMetrics()

    scored_pairs = 0  # scored_batches takes consecutive pairs: the next batch's reference rows start here

    def score_filler(refs, batch):
        return score_batch(scoring, batch, dpo, refs)

    def score(batch):
        nonlocal scored_pairs
        rows = None if ref_logps is None else ref_logps[scored_pairs : scored_pairs + batch.num_pairs]
        scored_pairs += batch.num_pairs
        return score_batch(scoring, batch, dpo, rows)

    try:
        for start, stop, scores in scored_batches(pairs, pad_token_id, layout, batch_size, device, score):
            metrics.add(
                scores.losses,
                scores.chosen_rewards,
                scores.rejected_rewards,
                scores.logps.chosen,
                scores.logps.rejected,
            )
            if per_pair is not None:
                _append_rows(per_pair, start, scores)
            if on_batch is not None:
                on_batch(stop - start)
        filler_refs = None if ref_logps is None else torch.zeros((1, 2))
        for _ in range(min_batches - math.ceil(len(pairs) / batch_size)):
            next(scored_batches([filler], pad_token_id, layout, 1, device, partial(score_filler, filler_refs)))
    finally:
        model.train(was_training)
    (num_pairs,) = sum_over_ranks([metrics.count])  # means() are over every rank's pairs too
    return {**metrics.means(), "num_pairs": int(num_pairs)}


def _append_rows(rows: list[dict], start: int, scores) -> None:
    for i in range(scores.losses.shape[0]):
        chosen, rejected = float(scores.chosen_rewards[i]), float(scores.rejected_rewards[i])
        rows.append(
            {
                "index": start + i,
                "loss": float(scores.losses[i]),
                "reward_chosen": chosen,
                "reward_rejected": rejected,
                "margin": chosen - rejected,
                "correct": chosen > rejected,
                "logps_chosen": float(scores.logps.chosen[i]),
                "logps_rejected": float(scores.logps.rejected[i]),
            }
        )
