"""One batch through the policy and the reference: the DPO loss and the per-pair numbers behind the metrics.

Training and evaluation both call `score_batch`, so the numbers `eval` reports are computed exactly as the ones the
optimizer saw. The reference comes from one of three places: a pass with the adapters disabled, the batch (when it
was precomputed before training), or nowhere at all (reference-free SimPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cli.config import DpoSection
from dpo_cli.dpo.layouts import PreferenceBatch
from dpo_cli.dpo.logprobs import CompletionLogps, completion_logps
from dpo_cli.dpo.losses import (
    LossOptions,
    PairLogps,
    length_desensitized_logps,
    preference_loss,
    rewards,
    simpo_rewards,
    wpo_weights,
)
from dpo_cli.model.load import backbone_and_head, logit_transform, reference_mode


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


def policy_logps(model, batch: PreferenceBatch, with_sum_sq: bool = False) -> CompletionLogps:
    backbone, lm_head = backbone_and_head(model)
    scale, softcap = logit_transform(model)
    return completion_logps(backbone, lm_head, batch, scale, softcap, with_sum_sq)


def reference_logps(model, batch: PreferenceBatch) -> CompletionLogps:
    with reference_mode(model):
        return policy_logps(model, batch)


def sequence_logps(logps: CompletionLogps, ld_alpha: float | None) -> torch.Tensor:
    """(2P,) the per-completion log-probs the losses see: plain sums, or LD-DPO's length-desensitised sums."""
    if ld_alpha is None:
        return logps.sums
    return length_desensitized_logps(logps.token_logps, logps.token_completion, logps.lengths, ld_alpha)


def reference_sequence_logps(model, batch: PreferenceBatch, dpo: DpoSection) -> torch.Tensor:
    """(2P,) reference log-probs as the losses see them: precomputed ones when the batch carries them."""
    if batch.ref_chosen_logps is not None and batch.ref_rejected_logps is not None:
        return torch.cat([batch.ref_chosen_logps, batch.ref_rejected_logps])
    return sequence_logps(reference_logps(model, batch), dpo.ld_alpha)


def loss_options(dpo: DpoSection) -> LossOptions:
    return LossOptions(
        beta=dpo.beta,
        label_smoothing=dpo.label_smoothing,
        discopop_tau=dpo.discopop_tau,
        f_divergence_type=dpo.f_divergence_type,
        f_alpha_divergence_coef=dpo.f_alpha_divergence_coef,
        gamma=dpo.gamma,
    )


def score_batch(model, batch: PreferenceBatch, dpo: DpoSection) -> BatchScores:
    # The reference goes first: its activations are freed before the policy's autograd graph is built.
    reference = None if dpo.reference_free else reference_sequence_logps(model, batch, dpo)
    policy = policy_logps(model, batch, with_sum_sq=dpo.use_weighting)
    chosen, rejected = sequence_logps(policy, dpo.ld_alpha).chunk(2)
    if reference is None:  # SimPO
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    else:
        ref_chosen, ref_rejected = reference.chunk(2)
    chosen_lengths, rejected_lengths = policy.lengths.chunk(2)
    plain_chosen = policy.sums.chunk(2)[0] if dpo.ld_alpha is not None else None
    logps = PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, plain_chosen)
    pair_weights = None
    if dpo.use_weighting:
        pair_weights = wpo_weights(policy.token_logps, policy.log_sum_sq_probs, policy.token_completion, policy.lengths)
    losses = preference_loss(
        logps, dpo.loss_type, loss_options(dpo), dpo.loss_weights, pair_weights, dpo.reference_free
    )
    reward_function = simpo_rewards if dpo.reference_free else rewards
    chosen_rewards, rejected_rewards = reward_function(logps, dpo.beta)
    return BatchScores(losses, logps, chosen_rewards, rejected_rewards, policy)
