"""One batch through the policy and the reference: the DPO loss and the per-pair numbers behind the metrics.

Training and evaluation both call `score_batch`, so the numbers `eval` reports are computed exactly as the ones the
optimizer saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cli.batching import PreferenceBatch
from dpo_cli.config import DpoSection
from dpo_cli.logprobs import CompletionLogps, completion_logps
from dpo_cli.losses import PairLogps, preference_loss, rewards
from dpo_cli.model import backbone_and_head, logit_transform, reference_mode


@dataclass
class BatchScores:
    losses: torch.Tensor  # (P,) per-pair loss, differentiable when the policy pass was
    logps: PairLogps
    chosen_rewards: torch.Tensor  # (P,) detached
    rejected_rewards: torch.Tensor  # (P,) detached
    policy: CompletionLogps

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()


def policy_logps(model, batch: PreferenceBatch) -> CompletionLogps:
    backbone, lm_head = backbone_and_head(model)
    scale, softcap = logit_transform(model)
    return completion_logps(backbone, lm_head, batch, scale, softcap)


def reference_logps(model, batch: PreferenceBatch) -> CompletionLogps:
    with reference_mode(model):
        return policy_logps(model, batch)


def score_batch(model, batch: PreferenceBatch, dpo: DpoSection) -> BatchScores:
    reference = reference_logps(model, batch)
    policy = policy_logps(model, batch)
    chosen, rejected = policy.chosen_rejected()
    ref_chosen, ref_rejected = reference.chosen_rejected()
    logps = PairLogps(chosen, rejected, ref_chosen, ref_rejected)
    losses = preference_loss(logps, dpo.loss_type, dpo.beta, dpo.label_smoothing)
    chosen_rewards, rejected_rewards = rewards(logps, dpo.beta)
    return BatchScores(losses, logps, chosen_rewards, rejected_rewards, policy)
