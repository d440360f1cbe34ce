"""What a run trains, as the one seam between the loop and the objective: DPO here, SFT in dpo_cli/sft/.

A run is built, stepped, checkpointed, resumed and reported the same way whatever it trains (setup.py, loop.py,
callbacks.py). What differs is small, and is an `Objective`:
- which data it reads (`data_kind`: preference pairs, or SFT examples, data/sft_formats.py);
- how a micro-batch is laid out (`collate`) and scored (`score`: the summed loss, differentiable, and its metrics);
- what one example weighs in a step's mean loss (`example_weights`: a pair each for DPO; its trained tokens for
  SFT, whose loss is the mean over every trained token of the step, as TRL's);
- the metric names the progress bar shows, and how held-out data is evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dpo_cli.config import Recipe
from dpo_cli.dpo.layouts import PreferenceBatch, collate, pair_tokens
from dpo_cli.dpo.scoring import ScoringModel, score_batch
from dpo_cli.run.evaluate import evaluate_pairs
from dpo_cli.run.metrics import PairMetrics
from dpo_cli.run.reference import PAIR_KEYS


@dataclass
class MicroBatchScores:
    """One micro-batch, scored: what the loop backpropagates and what the metrics add up."""

    loss_sum: torch.Tensor  # () the sum of the per-unit losses (pairs or tokens), differentiable
    details: Any  # the objective's own scores, for its metrics' `add`


class StepMetrics(Protocol):
    def add(self, scores: MicroBatchScores) -> None: ...

    def means(self) -> dict[str, float]: ...


class Objective(Protocol):
    name: str
    data_kind: str
    """The kind of data read (data/split.py SplitRequest.kind): "preference" or "sft"."""
    accuracy_key: str
    """The record's key the progress bar shows as `acc`."""
    uses_reference: bool
    """Whether the reference log-probs are precomputed for it (run/reference.py)."""

    def collate(self, layout: str, examples: Sequence[Mapping], pad_token_id: int) -> PreferenceBatch: ...

    def score(
        self, scoring: ScoringModel, batch: PreferenceBatch, ref_logps: torch.Tensor | None
    ) -> MicroBatchScores: ...

    def metrics(self) -> StepMetrics: ...

    def example_weights(self, examples) -> list[int] | None:
        """What each example of a tokenized split weighs in a step's mean loss; None: one each."""

    def tokens_per_example(self, examples) -> list[int]:
        """Tokens each example puts in a micro-batch: what --max-tokens-per-batch counts."""

    def evaluate(
        self, model, examples, pad_token_id: int, batch_size: int, layout: str, ref_logps, min_batches: int, filler
    ) -> dict:
        """The objective's metrics of `model` over held-out `examples`, without gradients (keys without eval_).
        `min_batches`: a sharded run's processes must run as many forwards each, so after `examples` the example
        `filler` is scored alone, not counted, until that many batches ran."""


class _DpoMetrics:
    def __init__(self):
        self.pairs = PairMetrics()

    def add(self, scores: MicroBatchScores) -> None:
        s = scores.details
        self.pairs.add(s.losses, s.chosen_rewards, s.rejected_rewards, s.logps.chosen, s.logps.rejected)

    def means(self) -> dict[str, float]:
        return self.pairs.means()


@dataclass
class DpoObjective:
    """The preference losses of dpo/ (score_batch), each pair one unit of the step's mean."""

    recipe: Recipe
    name: str = "dpo"
    data_kind: str = "preference"
    accuracy_key: str = "rewards/accuracies"
    uses_reference: bool = True

    def collate(self, layout, examples, pad_token_id):
        return collate(layout, examples, pad_token_id)

    def score(self, scoring, batch, ref_logps):
        scores = score_batch(scoring, batch, self.recipe.dpo, ref_logps)
        return MicroBatchScores(scores.losses.sum(), scores)

    def metrics(self):
        return _DpoMetrics()

    def example_weights(self, examples):
        return None

    def tokens_per_example(self, examples):
        return tokens_per_pair(examples)

    def evaluate(self, model, examples, pad_token_id, batch_size, layout, ref_logps, min_batches=0, filler=None):
        return evaluate_pairs(
            model,
            examples,
            pad_token_id,
            self.recipe.dpo,
            batch_size,
            layout=layout,
            ref_logps=ref_logps,
            min_batches=min_batches,
            filler=filler,
        )


def objective_for(recipe: Recipe) -> Objective:
    """The objective `recipe.training.objective` names."""
    if recipe.training.objective == "sft":
        from dpo_cli.sft.objective import SftObjective  # sft builds on this module

        return SftObjective(recipe.sft.loss_on_prompt)
    return DpoObjective(recipe)


def arrow_lengths(examples, keys: Sequence[str]) -> list[list[int]]:
    """Per example, the list lengths of `keys` of a tokenized split, from Arrow: no token id becomes a Python int."""
    import pyarrow.compute as pc

    rows: list[list[int]] = []
    for table in examples.with_format("arrow").iter(batch_size=8192):
        lengths = [pc.list_value_length(table.column(key)).to_numpy() for key in keys]
        rows.extend([int(n) for n in counts] for counts in zip(*lengths, strict=True))
    return rows


def tokens_per_pair(pairs) -> list[int]:
    """`pair_tokens` of each pair of a tokenized split."""
    return [pair_tokens(*lengths) for lengths in arrow_lengths(pairs, PAIR_KEYS)]
