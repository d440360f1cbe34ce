"""Completion log-probs straight from the final hidden states, never as a `(batch, seq, vocab)` logits tensor.

Only the positions that predict a completion token go through the LM head, a chunk of tokens at a time, with the
log-softmax in float32. A custom autograd function keeps just the hidden states, the targets and one float per
token (the log-partition) for backward, and recomputes each chunk's logits there. Peak extra memory is one
`(chunk, vocab)` float32 block instead of the whole `(batch, seq, vocab)` logits and their gradient, which for a
7B model with a 128k vocabulary at 2x1024 tokens is the difference between 1 GiB and 20+ MiB.

This module imports only torch and the layouts' attention masks: the backbone and LM head are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cli.dpo.attention import model_attention_mask

# Elements of one (chunk, vocab) float32 logits block: 2**24 floats = 64 MiB, e.g. 128 tokens of a 128k vocabulary.
DEFAULT_CHUNK_ELEMENTS = 2**24


def _chunk_logits(hidden, weight, bias, logit_scale, softcap):
    """float32 logits of one chunk, transformed as the model's own forward does (scale, then soft-capping)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


class _FusedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, logit_scale, softcap, with_sum_sq):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> log p(target) (N,) float32, and with
        # `with_sum_sq` also log Σ_v p_v² (N,) float32 (no gradient; WPO's weights read it), else None
        log_z = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        target_logits = torch.empty_like(log_z)
        # Whether the target is the top-1 token (SFT's token accuracy), from the peak already at hand; a target tied
        # with the peak counts as top-1 (argmax would pick the lower id).
        target_is_top = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        log_sum_sq = torch.empty_like(log_z) if with_sum_sq else None
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk_size):
                stop = start + chunk_size
                logits = _chunk_logits(hidden[start:stop], weight, bias, logit_scale, softcap)
                target_logits[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1)
                # logsumexp by hand, in place in the logits block: one (chunk, vocab) buffer instead of two.
                peak = logits.amax(dim=-1, keepdim=True)
                target_is_top[start:stop] = target_logits[start:stop] >= peak.squeeze(1)
                shifted_exp = logits.sub_(peak).exp_()
                log_sum_exp = shifted_exp.sum(dim=-1).log_()
                log_z[start:stop] = log_sum_exp + peak.squeeze(1)
                if with_sum_sq:  # log Σ p² = log Σ e^(2(z-m)) - 2 log Σ e^(z-m), from the same block
                    log_sum_sq[start:stop] = shifted_exp.square_().sum(dim=-1).log_() - 2 * log_sum_exp
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.chunk_size, ctx.logit_scale, ctx.softcap = chunk_size, logit_scale, softcap
        # One call: each call replaces the set of non-differentiable outputs.
        ctx.mark_non_differentiable(*([log_sum_sq] if with_sum_sq else []), target_is_top)
        return target_logits - log_z, log_sum_sq, target_is_top

    @staticmethod
    def backward(ctx, grad_logps, _grad_log_sum_sq, _grad_is_top):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            chunk = hidden[start:stop]
            logits = _chunk_logits(chunk, weight, bias, ctx.logit_scale, ctx.softcap)
            # d/dx c*tanh(x/c) = 1 - tanh(x/c)^2, and logits hold c*tanh(x/c): taken before logits are overwritten.
            softcap_slope = 1 - (logits / ctx.softcap) ** 2 if ctx.softcap is not None else None
            # d log p(y) / d logits = onehot(y) - softmax(logits), scaled by the incoming gradient; computed in place
            # in the logits block so backward holds one (chunk, vocab) buffer, not two.
            grad_logits = logits.sub_(log_z[start:stop, None]).exp_().neg_()
            grad_logits.scatter_add_(1, targets[start:stop, None], torch.ones_like(grad_logits[:, :1]))
            grad_logits.mul_(grad_logps[start:stop, None])
            if softcap_slope is not None:
                grad_logits.mul_(softcap_slope)
            if ctx.logit_scale != 1.0:
                grad_logits.mul_(ctx.logit_scale)
            if need_hidden:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.t() @ chunk.float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for each row of `hidden` (N, H), as float32 (N,), differentiable."""
    return _fused(hidden, weight, targets, bias, logit_scale, softcap, chunk_elements, with_sum_sq=False)[0]


def token_logps_and_sum_sq(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps`, and log Σ_v p_v² per row (N,) from the same pass over the vocabulary, without gradient."""
    return _fused(hidden, weight, targets, bias, logit_scale, softcap, chunk_elements, with_sum_sq=True)[:2]


def _fused(hidden, weight, targets, bias, logit_scale, softcap, chunk_elements, with_sum_sq):
    """(log p(target) (N,), log Σ p² (N,) or None, target is the top-1 token (N,) bool)."""
    chunk_size = max(1, chunk_elements // weight.shape[0])  # tokens per (chunk, vocab) block
    scale = float(logit_scale)
    return _FusedTokenLogProbs.apply(hidden, weight, bias, targets, chunk_size, scale, softcap, with_sum_sq)


@dataclass
class CompletionLogps:
    token_logps: torch.Tensor  # (N,) float32, one per scored token, completions contiguous and in order
    token_completion: torch.Tensor  # (N,) long, which completion each scored token belongs to
    sums: torch.Tensor  # (2P,) float32, summed log-probs per completion, chosen first
    lengths: torch.Tensor  # (2P,) long, scored tokens per completion
    log_sum_sq_probs: torch.Tensor | None = None  # (N,) float32 log Σ_v p_v² per scored token, no grad, when asked
    token_is_top: torch.Tensor | None = None  # (N,) bool, the scored token is the model's top-1 (SFT's accuracy)

    def chosen_rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sums.chunk(2)


def sum_per_completion(values: torch.Tensor, token_completion: torch.Tensor, num_completions: int) -> torch.Tensor:
    """Sum per-token `values` (N,) into their completions (2P,), differentiably."""
    return values.new_zeros(num_completions).index_add(0, token_completion, values)


def completion_logps(
    backbone,
    lm_head,
    batch,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    with_sum_sq: bool = False,
    attention_backend: str = "eager",
    mask_dtype: torch.dtype = torch.float32,
):
    """Run the backbone over a `PreferenceBatch` and score its completion tokens through `lm_head`.

    With `with_sum_sq`, also log Σ_v p_v² per scored token (what WPO's weights need), at no extra matmul. A packed
    batch's block mask is built for `attention_backend` (an eager additive mask in `mask_dtype`)."""
    hidden_states = backbone(
        input_ids=batch.input_ids,
        attention_mask=model_attention_mask(batch, attention_backend, mask_dtype),  # packed layouts' mask, explicit
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, T, H)
    scored = batch.scored
    hidden = hidden_states[scored]  # (N, H), row-major: each completion's tokens contiguous
    targets = batch.target_ids[scored]
    token_completion = batch.completion_index[scored]
    logps, log_sum_sq, is_top = _fused(
        hidden, lm_head.weight, targets, lm_head.bias, logit_scale, softcap, DEFAULT_CHUNK_ELEMENTS, with_sum_sq
    )
    num_completions = batch.num_completions
    return CompletionLogps(
        token_logps=logps,
        token_completion=token_completion,
        sums=sum_per_completion(logps, token_completion, num_completions),
        lengths=torch.bincount(token_completion, minlength=num_completions),
        log_sum_sq_probs=log_sum_sq,
        token_is_top=is_top,
    )
