"""Preference losses: pure functions of the four per-pair log-prob vectors.

Every loss of TRL 1.16's DPOTrainer is here under TRL's name, each a function `(PairLogps, LossOptions) -> (P,)`
giving one loss per pair; the formulas follow TRL's `_compute_loss` term by term so the tests can hold us to its
numbers. Which options each reads and when it is valid is its spec in `loss_specs.py`; SimPO (`simpo_loss`) is a
spec of its own. `preference_loss` sums the selected losses with their weights, and applies the WPO pair weights.
Two per-token reductions live here too, because they belong to loss options rather than to log-prob computation:
LD-DPO's length-desensitised sums and WPO's weights. Nothing here knows about models, batches or files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_cli.dpo.loss_specs import LOSS_SPECS, RECIPE_LOSS_TYPES


@dataclass
class PairLogps:
    chosen: torch.Tensor  # (P,) policy log p(chosen | prompt), summed (or LD-weighted, see `ld_alpha`)
    rejected: torch.Tensor  # (P,)
    ref_chosen: torch.Tensor  # (P,) reference log p(chosen | prompt), zeros when reference-free
    ref_rejected: torch.Tensor  # (P,)
    chosen_lengths: torch.Tensor | None = None  # (P,) completion tokens: ipo, sigmoid_norm and SimPO divide by them
    rejected_lengths: torch.Tensor | None = None  # (P,)
    chosen_unweighted: torch.Tensor | None = None  # (P,) plain summed log-probs for sft when `chosen` is LD-weighted

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) completion lengths, at least 1 so that an empty completion divides safely, as in TRL."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError("this loss normalises by completion length: build PairLogps with the lengths")
        return self.chosen_lengths.clamp(min=1), self.rejected_lengths.clamp(min=1)


@dataclass(frozen=True)
class LossOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    gamma: float = 0.5  # SimPO's target reward margin


# f-divergences (Wang et al. 2023, f-DPO) -------------------------------------------------------------------------
# Each maps a log-ratio u = log(πθ/πref) to f'(πθ/πref), the score that replaces u in the reward difference.


def _forward_kl(logratios: torch.Tensor, coef: float) -> torch.Tensor:
    return 1 - torch.exp(-logratios)  # f'(t) = 1 - 1/t


def _js_divergence(logratios: torch.Tensor, coef: float) -> torch.Tensor:
    return math.log(2) + F.logsigmoid(logratios)  # f'(t) = log(2t / (t + 1))


def _alpha_divergence(logratios: torch.Tensor, coef: float) -> torch.Tensor:
    """f'(t) = (t^(α-1) - 1) / (α-1), computed in float32 with TRL's clamp so exp stays finite in low precision."""
    if abs(coef - 1.0) < 1e-6:  # the α -> 1 limit is log t: reverse KL
        return logratios
    exponent = (coef - 1.0) * logratios
    clamp_max = 11.0 if exponent.dtype == torch.float16 else 80.0
    return (torch.exp(exponent.float().clamp(max=clamp_max)) - 1.0).to(exponent.dtype) * (1.0 / (coef - 1.0))


F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor] | None] = {
    "reverse_kl": None,  # the identity: standard DPO
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


def divergence_scores(x: PairLogps, o: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores: the log-ratios passed through the f-divergence's f'."""
    transform = F_DIVERGENCES[o.f_divergence_type]
    if transform is None:
        return x.chosen_logratios, x.rejected_logratios
    coef = o.f_alpha_divergence_coef
    return transform(x.chosen_logratios, coef), transform(x.rejected_logratios, coef)


def delta_score(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """Δ = score(chosen) - score(rejected); with reverse KL, the DPO reward margin over β."""
    chosen, rejected = divergence_scores(x, o)
    return chosen - rejected


def _length_normalised_delta(x: PairLogps, o: LossOptions) -> torch.Tensor:
    chosen, rejected = divergence_scores(x, o)
    chosen_lengths, rejected_lengths = x.lengths()
    return chosen / chosen_lengths - rejected / rejected_lengths


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


# The losses -------------------------------------------------------------------------------------------------------


def sigmoid_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), with cDPO label smoothing: -(1-ε) log σ(β Δ) - ε log σ(-β Δ).

    TRL 1.16's `sigmoid` ignores label_smoothing (it is -log σ(β Δ), which is ours at ε = 0); we keep cDPO, as TRL
    before 1.0 had it, rather than silently ignore a setting.
    """
    return _smoothed_logistic(o.beta * delta_score(x, o), o.label_smoothing)


def hinge_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """SLiC (Zhao et al. 2023): max(0, 1 - β Δ)."""
    return torch.relu(1 - o.beta * delta_score(x, o))


def ipo_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """IPO (Azar et al. 2023), eq. 17 with β as τ: (Δ_avg - 1/(2β))², on per-token averages of the scores.

    TRL divides each score by its completion's token count (confirmed with the IPO authors), so β means the same
    whatever the completion lengths.
    """
    return (_length_normalised_delta(x, o) - 1 / (2 * o.beta)) ** 2


def exo_pair_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024), eq. 16: KL(q || p) between q = softmax of the pair's β-scaled scores and the
    smoothed labels p = (1-ε, ε); needs ε > 0, the paper suggests 1e-3."""
    logits = o.beta * delta_score(x, o)
    epsilon = torch.tensor(o.label_smoothing, device=logits.device)
    chosen_q, rejected_q = torch.sigmoid(logits), torch.sigmoid(-logits)
    chosen_log_q, rejected_log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    return chosen_q * (chosen_log_q - torch.log1p(-epsilon)) + rejected_q * (rejected_log_q - torch.log(epsilon))


def nca_pair_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """NCA (Chen et al. 2024): -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l), with r = β log(πθ/πref)."""
    chosen_rewards, rejected_rewards = o.beta * x.chosen_logratios, o.beta * x.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def robust_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): the unbiased loss under labels flipped with probability ε < 0.5,
    ((1-ε)(-log σ(β Δ)) - ε(-log σ(-β Δ))) / (1 - 2ε)."""
    logits = o.beta * delta_score(x, o)
    clean = -(1 - o.label_smoothing) * F.logsigmoid(logits)
    flipped = -o.label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * o.label_smoothing)


def bco_pair_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024): -log σ(r_w) - log σ(-r_l), each completion classified on its own."""
    return -F.logsigmoid(o.beta * x.chosen_logratios) - F.logsigmoid(-o.beta * x.rejected_logratios)


def sppo_hard_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """SPPO (Wu et al. 2024) with hard win probabilities 1 and 0: (u_w - 1/(2β))² + (u_l + 1/(2β))²."""
    return (x.chosen_logratios - 0.5 / o.beta) ** 2 + (x.rejected_logratios + 0.5 / o.beta) ** 2


def aot_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """AOT paired (Melnyk et al. 2024): the smoothed logistic loss on sorted policy vs sorted reference margins.

    Sorting runs over the batch, so pair i's loss pairs the i-th smallest margins, not pair i's own.
    """
    margins, _ = torch.sort(x.chosen - x.rejected, dim=0)
    ref_margins, _ = torch.sort(x.ref_chosen - x.ref_rejected, dim=0)
    return _smoothed_logistic(o.beta * (margins - ref_margins), o.label_smoothing)


def aot_unpaired_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """AOT unpaired (Melnyk et al. 2024): sorted chosen log-ratios against sorted rejected log-ratios."""
    chosen_sorted, _ = torch.sort(x.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(x.rejected_logratios, dim=0)
    return _smoothed_logistic(o.beta * (chosen_sorted - rejected_sorted), o.label_smoothing)


def apo_zero_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024), eq. 7: 1 - σ(r_w) + σ(r_l); raise chosen, lower rejected."""
    return 1 - torch.sigmoid(o.beta * x.chosen_logratios) + torch.sigmoid(o.beta * x.rejected_logratios)


def apo_down_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024), eq. 8: σ(r_w) + 1 - σ(r_w - r_l); lower both, rejected more."""
    chosen = torch.sigmoid(o.beta * x.chosen_logratios)
    return chosen + 1 - torch.sigmoid(o.beta * (x.chosen_logratios - x.rejected_logratios))


def discopop_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024), eq. 5: logistic and exponential losses of z = β Δ, mixed by σ(z / τ)."""
    logits = o.beta * delta_score(x, o)
    mix = torch.sigmoid(logits / o.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def sft_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024): minus the mean log-prob over all chosen tokens of the batch.

    One scalar for the batch (longer completions weigh more), repeated per pair so it adds to the other losses.
    """
    chosen = x.chosen if x.chosen_unweighted is None else x.chosen_unweighted
    if x.chosen_lengths is None:
        raise ValueError("sft averages over tokens: build PairLogps with the lengths")
    nll = -chosen.sum() / x.chosen_lengths.sum()
    return nll.expand(chosen.shape[0])


def sigmoid_norm_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """DPO on per-token averages of the scores: -log σ(β Δ_avg)."""
    return -F.logsigmoid(o.beta * _length_normalised_delta(x, o))


def simpo_loss(x: PairLogps, o: LossOptions) -> torch.Tensor:
    """SimPO (Meng et al. 2024), eq. 6: -log σ(β/|y_w| log πθ(y_w) - β/|y_l| log πθ(y_l) - γ), no reference."""
    chosen_lengths, rejected_lengths = x.lengths()
    return -F.logsigmoid(o.beta * (x.chosen / chosen_lengths - x.rejected / rejected_lengths) - o.gamma)


# Each spec of loss_specs.LOSS_SPECS names its function here; SimPO is `simpo`, reached by `dpo.reference_free`.
LOSS_FUNCTIONS: dict[str, Callable[[PairLogps, LossOptions], torch.Tensor]] = {
    name: globals()[spec.function] for name, spec in LOSS_SPECS.items()
}
# The losses a recipe's dpo.loss_type names, TRL's.
LOSS_TYPES = {name: LOSS_FUNCTIONS[name] for name in RECIPE_LOSS_TYPES}


def preference_loss(
    x: PairLogps,
    loss_types: list[str],
    options: LossOptions,
    loss_weights: list[float] | None = None,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss (P,): Σ_k weight_k · loss_k, each loss times the WPO `pair_weights` when given.

    `loss_types` are spec names (loss_specs.loss_names resolves a recipe's, e.g. sigmoid to simpo when reference-free).

    Its mean is TRL's loss: TRL sums weight_k · mean(loss_k), which is the same number.
    """
    weights = loss_weights if loss_weights is not None else [1.0] * len(loss_types)
    total = torch.zeros_like(x.chosen)
    for name, weight in zip(loss_types, weights, strict=True):
        per_pair = LOSS_FUNCTIONS[name](x, options)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        total = total + per_pair * weight
    return total


def rewards(x: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards β·log(πθ/πref) of chosen and rejected, detached: for metrics only."""
    return beta * x.chosen_logratios.detach(), beta * x.rejected_logratios.detach()


def simpo_rewards(x: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimPO's rewards β·log πθ(y)/|y|, detached (TRL's CPOTrainer logs these for `simpo`)."""
    chosen_lengths, rejected_lengths = x.lengths()
    return beta * (x.chosen / chosen_lengths).detach(), beta * (x.rejected / rejected_lengths).detach()


# Per-token reductions behind two options ---------------------------------------------------------------------------


def _position_in_completion(token_completion: torch.Tensor, num_completions: int) -> torch.Tensor:
    """1-based position of each scored token within its completion; completions are contiguous runs, any order."""
    index = torch.arange(token_completion.shape[0], device=token_completion.device)
    first = torch.full((num_completions,), token_completion.shape[0], device=index.device, dtype=index.dtype)
    first = first.scatter_reduce(0, token_completion, index, reduce="amin")
    return index - first[token_completion] + 1


def length_desensitized_logps(
    token_logps: torch.Tensor, token_completion: torch.Tensor, lengths: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024): per completion (2P,), the sum over the tokens both completions of the pair have
    plus α times the sum over the longer one's extra tokens, so verbosity alone moves the reward less.

    token_logps (N,), token_completion (N,) in 0..2P-1 (chosen first), lengths (2P,).
    """
    num_completions = lengths.shape[0]
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    shared_lengths = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)  # (2P,)
    position = _position_in_completion(token_completion, num_completions)
    in_tail = position > shared_lengths[token_completion]
    zeros = token_logps.new_zeros(num_completions)
    shared = zeros.index_add(0, token_completion, token_logps * ~in_tail)
    tail = zeros.index_add(0, token_completion, token_logps * in_tail)
    return shared + ld_alpha * tail


def wpo_weights(
    token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, token_completion: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """WPO (Zhou et al. 2024), eq. 2: per pair (P,), w(y_w)·w(y_l), without gradient, where
    w(y) = exp(mean over y's tokens of log p(y_t) - log Σ_v p(v)²): how likely y is on-policy, per token, measured
    against the policy's own sampling distribution so peaked and flat tokens weigh alike."""
    with torch.no_grad():
        aligned = token_logps - log_sum_sq_probs
        sums = aligned.new_zeros(lengths.shape[0]).index_add(0, token_completion, aligned)
        weights = torch.exp(sums / lengths.clamp(min=1))
        chosen, rejected = weights.chunk(2)
        return chosen * rejected
