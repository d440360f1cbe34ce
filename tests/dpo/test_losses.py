"""Each loss and loss option on numbers small enough to work out by hand; the working is in each docstring.

Unless a test says otherwise, the pair is: policy log p(chosen) = -1, log p(rejected) = -2, and the reference gives
both -1.5. So the log-ratios are u_w = 0.5 and u_l = -0.5, the margin Δ = u_w - u_l = 1, and the chosen and
rejected completions have 2 and 4 tokens. Useful values: log σ(1) = -0.3132617, log σ(-1) = -1.3132617,
log σ(0.5) = -0.4740770, log σ(-0.5) = -0.9740770, σ(0.5) = 0.6224593, σ(1) = 0.7310586.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_cli.dpo import losses
from dpo_cli.dpo.losses import LossOptions, PairLogps, preference_loss


def pair(**overrides) -> PairLogps:
    values = {"chosen": [-1.0], "rejected": [-2.0], "ref_chosen": [-1.5], "ref_rejected": [-1.5]}
    values.update({key: value for key, value in overrides.items() if key in values})
    lengths = {"chosen_lengths": [2], "rejected_lengths": [4]}
    lengths.update({key: value for key, value in overrides.items() if key in lengths})
    return PairLogps(
        **{key: torch.tensor(value) for key, value in values.items()},
        **{key: torch.tensor(value, dtype=torch.long) for key, value in lengths.items()},
    )


def two_pairs() -> PairLogps:
    """Pair A as above; pair B: log p(chosen) = -3, log p(rejected) = -1, reference -1 and -2 (u_w = -2, u_l = 1)."""
    return pair(chosen=[-1.0, -3.0], rejected=[-2.0, -1.0], ref_chosen=[-1.5, -1.0], ref_rejected=[-1.5, -2.0])


def check(loss_fn, expected, x=None, **options):
    value = loss_fn(x if x is not None else pair(), LossOptions(**options))
    torch.testing.assert_close(value, torch.tensor(expected, dtype=value.dtype), rtol=0, atol=1e-6)


def test_sigmoid():
    """-log σ(β Δ) with β = 1: -log σ(1) = 0.3132617.
    cDPO with ε = 0.1: 0.9 · 0.3132617 + 0.1 · 1.3132617 = 0.4132617 (TRL 1.16 ignores ε here; see losses.py)."""
    check(losses.sigmoid_loss, [0.3132617], beta=1.0)
    check(losses.sigmoid_loss, [0.4132617], beta=1.0, label_smoothing=0.1)


def test_hinge():
    """max(0, 1 - β Δ): β = 0.5 gives 1 - 0.5 = 0.5; β = 2 gives max(0, -1) = 0."""
    check(losses.hinge_loss, [0.5], beta=0.5)
    check(losses.hinge_loss, [0.0], beta=2.0)


def test_ipo_divides_scores_by_completion_length():
    """Δ_avg = 0.5/2 - (-0.5)/4 = 0.375; with β = 1, (0.375 - 1/2)² = 0.015625.
    Without the length division it would be (1 - 0.5)² = 0.25."""
    check(losses.ipo_loss, [0.015625], beta=1.0)


def test_exo_pair():
    """β = 1, ε = 0.1: q = (σ(1), σ(-1)) = (0.7310586, 0.2689414), p = (0.9, 0.1);
    KL = 0.7310586 (-0.3132617 - log 0.9) + 0.2689414 (-1.3132617 - log 0.1)
       = 0.7310586 · (-0.2079012) + 0.2689414 · 0.9893234 = -0.1519878 + 0.2660700 = 0.1140821."""
    check(losses.exo_pair_loss, [0.1140821], beta=1.0, label_smoothing=0.1)


def test_nca_pair():
    """r_w = 0.5, r_l = -0.5 (β = 1): -log σ(0.5) - ½ log σ(-0.5) - ½ log σ(0.5)
    = 0.4740770 + 0.4870385 + 0.2370385 = 1.1981540."""
    check(losses.nca_pair_loss, [1.1981540], beta=1.0)


def test_robust():
    """β = 1, ε = 0.1: (0.9 · 0.3132617 - 0.1 · 1.3132617) / 0.8 = (0.2819355 - 0.1313262) / 0.8 = 0.1882617."""
    check(losses.robust_loss, [0.1882617], beta=1.0, label_smoothing=0.1)


def test_bco_pair():
    """β = 1: -log σ(r_w) - log σ(-r_l) = -log σ(0.5) - log σ(0.5) = 2 · 0.4740770 = 0.9481540."""
    check(losses.bco_pair_loss, [0.9481540], beta=1.0)


def test_sppo_hard():
    """β = 0.5, so 1/(2β) = 1: (0.5 - 1)² + (-0.5 + 1)² = 0.25 + 0.25 = 0.5."""
    check(losses.sppo_hard_loss, [0.5], beta=0.5)


def test_aot_sorts_margins_over_the_batch():
    """Policy margins (log p(w) - log p(l)): A 1, B -2, sorted [-2, 1]; reference margins: A 0, B 1, sorted [0, 1].
    Sorted differences [-2, 0]; β = 1: [-log σ(-2), -log σ(0)] = [2.1269280, 0.6931472].
    (Unsorted, pair by pair, they would be [1, -3].)"""
    check(losses.aot_loss, [2.1269280, 0.6931472], two_pairs(), beta=1.0)


def test_aot_unpaired_sorts_each_side_over_the_batch():
    """u_w: A 0.5, B -2, sorted [-2, 0.5]; u_l: A -0.5, B 1, sorted [-0.5, 1]. Differences [-1.5, -0.5];
    β = 1: [-log σ(-1.5), -log σ(-0.5)] = [1.7014133, 0.9740770]."""
    check(losses.aot_unpaired_loss, [1.7014133, 0.9740770], two_pairs(), beta=1.0)


def test_apo_zero():
    """β = 1: 1 - σ(0.5) + σ(-0.5) = 1 - 0.6224593 + 0.3775407 = 0.7550814."""
    check(losses.apo_zero_loss, [0.7550814], beta=1.0)


def test_apo_down():
    """β = 1: σ(0.5) + 1 - σ(0.5 - (-0.5)) = 0.6224593 + 1 - 0.7310586 = 0.8914008."""
    check(losses.apo_down_loss, [0.8914008], beta=1.0)


def test_discopop():
    """z = β Δ = 1, τ = 1: mix σ(1) = 0.7310586;
    -log σ(1) (1 - 0.7310586) + e^-1 · 0.7310586 = 0.3132617 · 0.2689414 + 0.3678794 · 0.7310586
    = 0.0842491 + 0.2689414 = 0.3531905."""
    check(losses.discopop_loss, [0.3531905], beta=1.0, discopop_tau=1.0)


def test_sft_is_the_mean_nll_over_all_chosen_tokens_of_the_batch():
    """Chosen log-probs -1 (2 tokens) and -3 (4 tokens): -(-1 - 3) / (2 + 4) = 0.6666667 for every pair, not the
    mean of per-pair averages (0.5 + 0.75) / 2 = 0.625. With LD weighting, sft reads the unweighted sums."""
    x = pair(chosen=[-1.0, -3.0], rejected=[-2.0, -1.0], ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0])
    x.chosen_lengths = torch.tensor([2, 4])
    check(losses.sft_loss, [0.6666667, 0.6666667], x)
    x.chosen_unweighted, x.chosen = x.chosen, torch.tensor([-5.0, -5.0])
    check(losses.sft_loss, [0.6666667, 0.6666667], x)


def test_sigmoid_norm():
    """Δ_avg = 0.5/2 + 0.5/4 = 0.375; β = 1: -log σ(0.375) = log(1 + e^-0.375) = 0.5231233."""
    check(losses.sigmoid_norm_loss, [0.5231233], beta=1.0)


def test_simpo_ignores_the_reference():
    """β = 2, γ = 0.5: 2 · (-1/2 - (-2/4)) - 0.5 = -0.5, and -log σ(-0.5) = 0.9740770, whatever the reference."""
    check(losses.simpo_loss, [0.9740770], beta=2.0, gamma=0.5)
    check(losses.simpo_loss, [0.9740770], pair(ref_chosen=[-7.0], ref_rejected=[3.0]), beta=2.0, gamma=0.5)


@pytest.mark.parametrize(
    ("divergence", "expected"),
    [
        # 1 - e^-0.5 = 0.3934693, 1 - e^0.5 = -0.6487213: Δ = 1.0421906, -log σ(1.0421906) = 0.3020887
        ("forward_kl", 0.3020887),
        # log 2 + log σ(0.5) = 0.2190702, log 2 + log σ(-0.5) = -0.2809298: Δ = 0.5, -log σ(0.5) = 0.4740770
        ("js_divergence", 0.4740770),
        # α = 0.5: (e^-0.25 - 1)/-0.5 = 0.4423984, (e^0.25 - 1)/-0.5 = -0.5680508: Δ = 1.0104493, loss 0.3104622
        ("alpha_divergence", 0.3104622),
        ("reverse_kl", 0.3132617),  # Δ = 1: plain DPO
    ],
)
def test_f_divergences_transform_the_log_ratios(divergence, expected):
    """sigmoid with β = 1 on the f-transformed scores f'(e^u) of u_w = 0.5, u_l = -0.5 (working beside each case)."""
    check(losses.sigmoid_loss, [expected], beta=1.0, f_divergence_type=divergence)


def test_alpha_divergence_with_coefficient_one_is_reverse_kl_and_large_ratios_stay_finite():
    """α = 1 is the log t limit: plain DPO, 0.3132617. With α = 0.5 a log-ratio of -1000 would need e^500;
    TRL clamps the exponent at 80, so the score is (e^80 - 1)/-0.5, finite."""
    check(losses.sigmoid_loss, [0.3132617], beta=1.0, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    extreme = pair(chosen=[-1001.5])
    scores = losses.divergence_scores(extreme, LossOptions(f_divergence_type="alpha_divergence"))
    assert torch.isfinite(scores[0]).all()
    assert scores[0].item() == pytest.approx((math.exp(80.0) - 1) / -0.5, rel=1e-6)


def test_preference_loss_weighs_and_sums_losses_and_applies_pair_weights():
    """MPO-style [sigmoid, bco_pair] with weights [0.8, 0.2], β = 1: 0.8 · 0.3132617 + 0.2 · 0.9481540 = 0.4402402;
    WPO pair weight 0.5 halves each term: 0.2201201. SimPO is a loss of its own, `simpo` (β = 2, γ = 0.5:
    0.9740770, see test_simpo_ignores_the_reference)."""
    x, options = pair(), LossOptions(beta=1.0)
    total = preference_loss(x, ["sigmoid", "bco_pair"], options, [0.8, 0.2])
    torch.testing.assert_close(total, torch.tensor([0.4402402]), rtol=0, atol=1e-6)
    halved = preference_loss(x, ["sigmoid", "bco_pair"], options, [0.8, 0.2], pair_weights=torch.tensor([0.5]))
    torch.testing.assert_close(halved, torch.tensor([0.2201201]), rtol=0, atol=1e-6)
    simpo = preference_loss(x, ["simpo"], LossOptions(beta=2.0, gamma=0.5))
    torch.testing.assert_close(simpo, torch.tensor([0.9740770]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        preference_loss(x, ["sigmoid", "bco_pair"], options, [1.0])


def test_length_desensitized_logps_split_shared_and_tail_tokens():
    """One pair; chosen tokens [-0.1, -0.2], rejected tokens [-0.3, -0.4, -1.0, -2.0], so 2 tokens are shared.
    α = 0.5: chosen -0.1 - 0.2 = -0.3 (no tail); rejected -0.7 + 0.5 · (-3.0) = -2.2.
    The same holds whatever order the completions' runs come in (a shared-prompt layout interleaves them)."""
    token_logps = torch.tensor([-0.1, -0.2, -0.3, -0.4, -1.0, -2.0])
    token_completion = torch.tensor([0, 0, 1, 1, 1, 1])
    lengths = torch.tensor([2, 4])
    ld = losses.length_desensitized_logps(token_logps, token_completion, lengths, 0.5)
    torch.testing.assert_close(ld, torch.tensor([-0.3, -2.2]))
    torch.testing.assert_close(
        losses.length_desensitized_logps(token_logps, token_completion, lengths, 1.0), ld.new_tensor([-0.3, -3.7])
    )
    # Two pairs with the rejected run of pair 0 first: completions 2 (rejected 0), 0, 3 (rejected 1), 1.
    token_logps = torch.tensor([-0.3, -0.4, -1.0, -0.1, -0.2, -0.5, -0.6, -0.7])
    token_completion = torch.tensor([2, 2, 2, 0, 0, 3, 1, 1])
    lengths = torch.tensor([2, 2, 3, 1])
    ld = losses.length_desensitized_logps(token_logps, token_completion, lengths, 0.5)
    # pair 0: shared 2 -> rejected -0.7 + 0.5 · -1.0 = -1.2; pair 1: shared 1 -> chosen -0.6 + 0.5 · -0.7 = -0.95
    torch.testing.assert_close(ld, torch.tensor([-0.3, -0.95, -1.2, -0.5]))


def test_wpo_weights():
    """Chosen: 2 tokens with log p = log Σp² = log 0.5, so w = exp(0) = 1. Rejected: 1 token with p = 0.25 where
    Σp² = 0.5: w = exp(log 0.25 - log 0.5) = 0.5. Pair weight 1 · 0.5 = 0.5, and no gradient flows through it."""
    token_logps = torch.log(torch.tensor([0.5, 0.5, 0.25])).requires_grad_()
    log_sum_sq = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    weights = losses.wpo_weights(token_logps, log_sum_sq, torch.tensor([0, 0, 1]), torch.tensor([2, 1]))
    torch.testing.assert_close(weights, torch.tensor([0.5]))
    assert not weights.requires_grad


def test_rewards():
    """β = 0.1: DPO rewards β u = (0.05, -0.05); SimPO's β log p / |y| = (0.1 · -1/2, 0.1 · -2/4) = (-0.05, -0.05)."""
    chosen, rejected = losses.rewards(pair(), 0.1)
    torch.testing.assert_close((chosen, rejected), (torch.tensor([0.05]), torch.tensor([-0.05])))
    chosen, rejected = losses.simpo_rewards(pair(), 0.1)
    torch.testing.assert_close((chosen, rejected), (torch.tensor([-0.05]), torch.tensor([-0.05])))


def test_every_trl_loss_is_registered_under_its_name():
    trl_names = {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip
    assert set(losses.LOSS_TYPES) == trl_names


def test_every_loss_spec_names_a_loss_function_and_options_a_setting_has():
    """The spec table (no torch) and the functions agree: each spec's function exists and takes (PairLogps,
    LossOptions); each option it reads or ranges over is a LossOptions field; the f-divergences are the same names;
    and `simpo` is its own entry, reached from the recipe's sigmoid by reference_free."""
    import dataclasses

    from dpo_cli.dpo import loss_specs

    option_names = {item.name for item in dataclasses.fields(losses.LossOptions)}
    for name, spec in loss_specs.LOSS_SPECS.items():
        assert losses.LOSS_FUNCTIONS[name] is getattr(losses, spec.function), name
        assert set(spec.reads) | set(spec.ranges) <= option_names, name
    assert tuple(losses.F_DIVERGENCES) == loss_specs.F_DIVERGENCE_TYPES
    assert losses.LOSS_FUNCTIONS["simpo"] is losses.simpo_loss and "simpo" not in losses.LOSS_TYPES
    assert loss_specs.loss_names(["sigmoid", "sft"], reference_free=True) == ["simpo", "sft"]
    assert loss_specs.loss_names(["sigmoid", "sft"], reference_free=False) == ["sigmoid", "sft"]


@pytest.mark.parametrize(("logit_scale", "softcap"), [(1.0, None), (0.5, 3.0)])
def test_fused_log_sum_sq_probs_match_full_logits_and_leave_gradients_alone(logit_scale, softcap):
    """WPO's per-token log Σ_v p_v² from the fused pass, against full float64 logits; the log-probs and their
    gradients are the same as without it (the extra output has no gradient)."""
    from dpo_cli.dpo.logprobs import token_logps, token_logps_and_sum_sq

    generator = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, generator=generator, requires_grad=True)
    weight = (torch.randn(v, h, generator=generator) * 0.5).requires_grad_()
    bias = torch.randn(v, generator=generator)
    targets = torch.randint(0, v, (n,), generator=generator)

    logps, log_sum_sq = token_logps_and_sum_sq(hidden, weight, targets, bias, logit_scale, softcap, 5 * v)
    logits = (hidden.detach().double() @ weight.detach().double().t() + bias.double()) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = torch.log_softmax(logits, dim=-1).exp().pow(2).sum(-1).log()
    torch.testing.assert_close(log_sum_sq.double(), expected, rtol=1e-5, atol=1e-6)
    assert not log_sum_sq.requires_grad

    grads = torch.autograd.grad(logps.sum(), (hidden, weight))
    plain = token_logps(hidden, weight, targets, bias, logit_scale, softcap, 5 * v)
    plain_grads = torch.autograd.grad(plain.sum(), (hidden, weight))
    torch.testing.assert_close(logps, plain, rtol=0, atol=0)
    for with_sq, without in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(with_sq, without, rtol=0, atol=0)
