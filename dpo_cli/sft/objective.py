"""The SFT objective: the mean negative log-likelihood of the trained tokens, as TRL 1.16's SFTTrainer computes it.

A step's loss is the sum of -log p(token) over every trained token of the step (all its micro-batches, and all
processes), divided by the number of those tokens: TRL's `num_items_in_batch`. So each token weighs the same however
the examples fall into micro-batches. The trained tokens are the completion's (`collate_sft`), or with
`sft.loss_on_prompt` every token a sequence predicts. Token accuracy is the share of trained tokens that are the
model's top-1 prediction; perplexity is exp(eval loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpo_cli.dpo.layouts import collate_sft
from dpo_cli.dpo.logprobs import CompletionLogps
from dpo_cli.dpo.scoring import direct_logps, policy_logps, scored_batches
from dpo_cli.model.load import scoring_model
from dpo_cli.run.distributed import sum_over_ranks
from dpo_cli.run.objective import MicroBatchScores, arrow_lengths

SFT_METRICS = ("loss", "mean_token_accuracy")
"""TRL's names: a step's record has these (plus grad_norm, learning_rate, tokens/s); eval's are eval_ prefixed."""


class SftMetrics:
    """Running sums over micro-batches: negative log-likelihood and top-1 hits of the trained tokens, and their
    count; `means()` of every process's tokens."""

    def __init__(self):
        self.nll = self.correct = 0.0
        self.tokens = 0

    def add(self, scores: MicroBatchScores) -> None:
        logps: CompletionLogps = scores.details
        self.nll -= float(logps.token_logps.detach().double().sum())
        self.correct += float(logps.token_is_top.sum())
        self.tokens += int(logps.token_logps.shape[0])

    def totals(self) -> tuple[float, float, int]:
        nll, correct, tokens = sum_over_ranks([self.nll, self.correct, float(self.tokens)])
        return nll, correct, int(tokens)

    def means(self) -> dict[str, float]:
        nll, correct, tokens = self.totals()
        return {"loss": nll / max(tokens, 1), "mean_token_accuracy": correct / max(tokens, 1)}


@dataclass
class SftObjective:
    loss_on_prompt: bool = False
    name: str = "sft"
    data_kind: str = "sft"
    accuracy_key: str = "mean_token_accuracy"
    uses_reference: bool = False

    def collate(self, layout, examples, pad_token_id):
        return collate_sft(layout, examples, pad_token_id, self.loss_on_prompt)

    def score(self, scoring, batch, ref_logps):
        logps = policy_logps(scoring, batch)
        return MicroBatchScores(-logps.token_logps.sum(), logps)

    def metrics(self):
        return SftMetrics()

    def example_weights(self, examples):
        """Each example's trained tokens: its sequence's length less the untrained part (at least the first token,
        which nothing predicts), as `collate_sft` scores it."""
        weights = []
        for prompt, completion in arrow_lengths(examples, ("prompt_ids", "chosen_ids")):
            untrained = 0 if self.loss_on_prompt else prompt
            weights.append(prompt + completion - max(untrained, 1))
        return weights

    def tokens_per_example(self, examples):
        return [prompt + completion for prompt, completion in arrow_lengths(examples, ("prompt_ids", "chosen_ids"))]

    def evaluate(self, model, examples, pad_token_id, batch_size, layout, ref_logps=None, min_batches=0, filler=None):
        """eval loss (the mean NLL of every trained token), perplexity, token accuracy, tokens and examples."""
        scoring = scoring_model(model)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        metrics = SftMetrics()

        def score(batch):
            return MicroBatchScores(torch.zeros(()), direct_logps(scoring, batch))

        try:
            for _, _, scores in _sft_batches(self, examples, pad_token_id, layout, batch_size, device, score):
                metrics.add(scores)
            for _ in range(min_batches - math.ceil(len(examples) / batch_size)):  # sharded: as many forwards as all
                next(_sft_batches(self, [filler], pad_token_id, layout, 1, device, score))
        finally:
            model.train(was_training)
        nll, correct, tokens = metrics.totals()
        (num_examples,) = sum_over_ranks([float(len(examples))])
        loss = nll / max(tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
            "mean_token_accuracy": correct / max(tokens, 1),
            "num_tokens": tokens,
            "num_examples": int(num_examples),
        }


def _sft_batches(objective: SftObjective, examples, pad_token_id, layout, batch_size, device, score):
    """`scored_batches` over SFT examples, laid out by the objective's collate."""
    return scored_batches(examples, pad_token_id, layout, batch_size, device, score, collate=objective.collate)
