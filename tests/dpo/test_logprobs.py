"""The fused completion log-probs against the slow obvious reference: full logits, log_softmax, gather."""

from __future__ import annotations

import pytest
import torch

from dpo_cli.demo.tiny import build_model
from dpo_cli.dpo.layouts import collate_padded
from dpo_cli.dpo.logprobs import completion_logps, sum_per_completion, token_logps


def reference_token_logps(hidden, weight, targets, bias=None, logit_scale=1.0, softcap=None):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize(
    ("logit_scale", "softcap", "with_bias"),
    [(1.0, None, False), (1.0, None, True), (0.5, None, False), (1.0, 3.0, True)],
)
def test_fused_token_logps_match_full_logits_values_and_gradients(logit_scale, softcap, with_bias):
    generator = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, generator=generator)
    weight = torch.randn(v, h, generator=generator) * 0.3
    bias = torch.randn(v, generator=generator) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=generator)
    upstream = torch.randn(n, generator=generator)

    fused_args = _leaves(hidden, weight, *([bias] if with_bias else []))
    # 5 * 101 elements per chunk: 8 chunks with a ragged last one, so chunk edges are exercised.
    fused = token_logps(
        fused_args[0],
        fused_args[1],
        targets,
        bias=fused_args[2] if with_bias else None,
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_elements=5 * v,
    )
    (fused * upstream).sum().backward()

    ref_args = _leaves(*(t.double() for t in (hidden, weight, *([bias] if with_bias else []))))
    reference = reference_token_logps(
        ref_args[0], ref_args[1], targets, ref_args[2] if with_bias else None, logit_scale, softcap
    )
    (reference * upstream.double()).sum().backward()

    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(fused_args, ref_args, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)


def test_sum_per_completion_routes_tokens_to_their_completion():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    index = torch.tensor([0, 0, 2, 2, 3])
    assert sum_per_completion(values, index, 4).tolist() == [3.0, 0.0, 7.0, 5.0]


def _tiny_lora_model():
    from peft import LoraConfig, get_peft_model

    model = build_model(vocab_size=97, seed=0, hidden_size=32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


def _pairs():
    return [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [1, 11], "chosen_ids": [12, 2], "rejected_ids": [13, 14, 15, 2]},
        {"prompt_ids": [1, 20, 21, 22, 23], "chosen_ids": [24, 2], "rejected_ids": [25, 26, 2]},
    ]


def test_completion_logps_match_full_logits_on_a_model_values_and_lora_gradients():
    model = _tiny_lora_model()
    batch = collate_padded(_pairs(), pad_token_id=0)
    backbone, lm_head = model.get_base_model().model, model.get_base_model().lm_head

    fused = completion_logps(backbone, lm_head, batch)
    fused.sums.sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # Reference: the model's own full logits, log_softmax over the vocabulary, gather, masked sum per row.
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    token = torch.log_softmax(logits, -1).gather(2, batch.target_ids[..., None]).squeeze(-1)
    scored = batch.completion_index >= 0
    reference = (token * scored).sum(dim=1)  # row r holds completion r in the padded layout
    reference.sum().backward()

    torch.testing.assert_close(fused.sums.double(), reference, rtol=1e-5, atol=1e-5)
    assert fused.lengths.tolist() == [3, 2, 2, 2, 4, 3]
    assert fused_grads, "the LoRA weights must receive gradients through the fused path"
    for name, grad in fused_grads.items():
        param = dict(model.named_parameters())[name]
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-6, msg=name)
