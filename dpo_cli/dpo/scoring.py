"""One batch through the policy and the reference: the DPO loss and the per-pair numbers behind the metrics.

Training and evaluation both call `score_batch`, so the numbers `eval` reports are computed exactly as the ones the
optimizer saw. The reference comes from one of three places: a pass with the adapters disabled, `ref_logps` handed
in (precomputed before training), or nowhere at all (reference-free SimPO). `scored_batches` is the one no-grad
batching loop that evaluation and the reference precompute both run.

The model arrives as a `ScoringModel` of plain values and callables (model/load.py's `scoring_model` builds it), and
the settings as anything with the recipe's dpo attributes, so this module imports only torch and dpo/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from dpo_cli.dpo.layouts import PreferenceBatch, collate
from dpo_cli.dpo.logprobs import CompletionLogps, completion_logps
from dpo_cli.dpo.loss_specs import LOSS_SPECS, loss_names
from dpo_cli.dpo.losses import (
    LossOptions,
    PairLogps,
    length_desensitized_logps,
    preference_loss,
    rewards,
    simpo_rewards,
    wpo_weights,
)


@dataclass(frozen=True)
class ScoringModel:
    """What scoring needs of a causal LM: the backbone (input_ids, attention_mask, position_ids, use_cache ->
    `.last_hidden_state` (R, T, H)), the LM head (its weight (V, H) and bias), the logit transform the model's own
    forward applies, its attention backend, and a context in which it runs as the reference (adapters off, no grad).

    `policy`, when set, replaces the policy pass: (batch, with_sum_sq) -> CompletionLogps. Data-parallel training
    sets it to a DistributedDataParallel module computing exactly `policy_logps`, since DDP averages gradients only
    for a forward that runs through it (run/distributed.py).
    """

    backbone: Callable[..., Any]
    lm_head: torch.nn.Module
    logit_scale: float = 1.0
    softcap: float | None = None
    attention_backend: str = "eager"
    mask_dtype: torch.dtype = torch.float32
    reference_mode: Callable[[], AbstractContextManager] | None = None
    policy: Callable[[PreferenceBatch, bool], CompletionLogps] | None = None


class DpoSettings(Protocol):
    """The settings scoring reads: the recipe's dpo section has them all."""

    beta: float
    loss_type: list[str]
    loss_weights: list[float] | None
    label_smoothing: float
    discopop_tau: float
    ld_alpha: float | None
    use_weighting: bool
    f_divergence_type: str
    f_alpha_divergence_coef: float
    reference_free: bool
    gamma: float


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


def policy_logps(model: ScoringModel, batch: PreferenceBatch, with_sum_sq: bool = False) -> CompletionLogps:
    """The policy's log-probs of `batch`, through `model.policy` when set (the data-parallel wrapper)."""
    if model.policy is not None:
        return model.policy(batch, with_sum_sq)
    return direct_logps(model, batch, with_sum_sq)


def direct_logps(model: ScoringModel, batch: PreferenceBatch, with_sum_sq: bool = False) -> CompletionLogps:
    """Log-probs of `batch` from the backbone and the LM head called directly (fused and chunked)."""
    return completion_logps(
        model.backbone,
        model.lm_head,
        batch,
        model.logit_scale,
        model.softcap,
        with_sum_sq,
        model.attention_backend,
        model.mask_dtype,
    )


def reference_logps(model: ScoringModel, batch: PreferenceBatch) -> CompletionLogps:
    if model.reference_mode is None:
        raise ValueError("this ScoringModel has no reference mode; build it with model.load.scoring_model")
    with model.reference_mode():  # never through `model.policy`: no gradient, nothing for DDP to reduce
        return direct_logps(model, batch)


def sequence_logps(logps: CompletionLogps, ld_alpha: float | None) -> torch.Tensor:
    """(2P,) the per-completion log-probs the losses see: plain sums, or LD-DPO's length-desensitised sums."""
    if ld_alpha is None:
        return logps.sums
    return length_desensitized_logps(logps.token_logps, logps.token_completion, logps.lengths, ld_alpha)


def reference_sequence_logps(model: ScoringModel, batch: PreferenceBatch, ld_alpha: float | None) -> torch.Tensor:
    """(2P,) reference log-probs as the losses see them, chosen first: one pass with the adapters off."""
    return sequence_logps(reference_logps(model, batch), ld_alpha)


def loss_options(dpo: DpoSettings) -> LossOptions:
    return LossOptions(
        beta=dpo.beta,
        label_smoothing=dpo.label_smoothing,
        discopop_tau=dpo.discopop_tau,
        f_divergence_type=dpo.f_divergence_type,
        f_alpha_divergence_coef=dpo.f_alpha_divergence_coef,
        gamma=dpo.gamma,
    )


def score_batch(
    model: ScoringModel, batch: PreferenceBatch, dpo: DpoSettings, ref_logps: torch.Tensor | None = None
) -> BatchScores:
    """Losses and rewards of `batch`; `ref_logps` (P, 2), each pair's precomputed (chosen, rejected) reference
    log-probs, replaces the reference pass."""
    names = loss_names(dpo.loss_type, dpo.reference_free)
    # The reference goes first: its activations are freed before the policy's autograd graph is built.
    reference = _reference_pair(model, batch, dpo, ref_logps)
    policy = policy_logps(model, batch, with_sum_sq=dpo.use_weighting)
    chosen, rejected = sequence_logps(policy, dpo.ld_alpha).chunk(2)
    if reference is None:  # SimPO: no reference, its terms are zero
        reference = torch.zeros_like(chosen), torch.zeros_like(rejected)
    ref_chosen, ref_rejected = reference
    chosen_lengths, rejected_lengths = policy.lengths.chunk(2)
    plain_chosen = policy.sums.chunk(2)[0] if dpo.ld_alpha is not None else None
    logps = PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, plain_chosen)
    pair_weights = None
    if dpo.use_weighting:
        pair_weights = wpo_weights(policy.token_logps, policy.log_sum_sq_probs, policy.token_completion, policy.lengths)
    losses = preference_loss(logps, names, loss_options(dpo), dpo.loss_weights, pair_weights)
    simpo = any(LOSS_SPECS[name].rewards == "simpo" for name in names)
    chosen_rewards, rejected_rewards = (simpo_rewards if simpo else rewards)(logps, dpo.beta)
    return BatchScores(losses, logps, chosen_rewards, rejected_rewards, policy)


def _reference_pair(
    model: ScoringModel, batch: PreferenceBatch, dpo: DpoSettings, ref_logps: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(chosen, rejected) reference log-probs (P,) each: handed in, from a pass with the adapters off, or None."""
    if dpo.reference_free:
        return None
    if ref_logps is not None:
        chosen, rejected = ref_logps.to(batch.input_ids.device).unbind(1)
        return chosen, rejected
    chosen, rejected = reference_sequence_logps(model, batch, dpo.ld_alpha).chunk(2)
    return chosen, rejected


Scored = TypeVar("Scored")


def scored_batches(
    pairs: Sequence[Mapping],
    pad_token_id: int,
    layout: str,
    batch_size: int,
    device: torch.device | str,
    score: Callable[[PreferenceBatch], Scored],
    collate: Callable[[str, Sequence[Mapping], int], PreferenceBatch] = collate,
) -> Iterator[tuple[int, int, Scored]]:
    """(start, stop, score(batch)) for consecutive batches of `pairs[start:stop]`, each scored without gradients;
    `collate` lays them out (SFT examples have their own, dpo/layouts.py `collate_sft`).

    Grad mode is switched off around `score` only, never across a `yield`, so the caller's code between batches
    runs as it would anyway."""
    for start in range(0, len(pairs), batch_size):
        stop = min(start + batch_size, len(pairs))
        batch = collate(layout, [pairs[i] for i in range(start, stop)], pad_token_id).to(device)
        with torch.no_grad():
            scored = score(batch)
        yield start, stop, scored
