"""The attention mask a packed batch needs, in the form the model's attention backend takes, and which layout a
model can run at all.

A packed row holds several sequences (or a pair's shared prompt and its two branches), so attention must be
block-diagonal causal, not causal over the row. Restarting `position_ids` per sequence does not do that under sdpa
(measured: logits off by 3.5), so the mask is always explicit:
- sdpa: a 4D boolean mask (True = may attend), which transformers passes through as given;
- eager: the same mask as an additive float mask (eager adds it to the scores, so a boolean would be wrong);
- flex_attention: a `BlockMask` built from the same rule, which skips fully masked blocks (the GPU path).
Other backends (flash-attention's padded kernels, paged attention) take no such mask, and a sliding window shorter
than a sequence would be lost under a custom mask: `unsupported_reason` says so, and the layout falls back to
padded.
"""

from __future__ import annotations

import inspect
import sys

import torch

from dpo_cli.dpo.layouts import LAYOUTS, SHARED, PreferenceBatch

MASKABLE_BACKENDS = ("sdpa", "eager", "flex_attention")


def attention_backend(backbone) -> str:
    return getattr(backbone.config, "_attn_implementation", None) or "eager"


def model_attention_mask(batch: PreferenceBatch, backbone):
    """What to pass as the backbone's `attention_mask` for `batch`: the 2D padding mask of a padded batch, else the
    batch's block mask in the backbone's backend's form."""
    if not batch.is_packed:
        return batch.attention_mask
    backend = attention_backend(backbone)
    if backend == "flex_attention":
        return flex_block_mask(batch)
    allowed = batch.attention_allowed()[:, None]  # (R, 1, T, T): one mask for every head
    if backend == "sdpa":
        return allowed
    if backend == "eager":
        dtype = backbone.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
    # unsupported_reason() keeps packed batches away from any other backend; reaching here is a bug
    raise ValueError(f"attention backend {backend!r} cannot take a packed batch's mask")


def flex_block_mask(batch: PreferenceBatch):
    """`batch.attention_allowed()` as a flex-attention BlockMask, from the same per-token segment and branch ids."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment, branch = batch.segment_ids, batch.branch_ids

    def mask_mod(b, h, q_idx, kv_idx):
        same_segment = (segment[b, q_idx] == segment[b, kv_idx]) & (segment[b, q_idx] >= 0)
        visible_branch = (branch[b, kv_idx] == SHARED) | (branch[b, kv_idx] == branch[b, q_idx])
        return ((kv_idx <= q_idx) & same_segment & visible_branch) | (q_idx == kv_idx)

    rows, width = segment.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment.device)


def unsupported_reason(model, max_length: int) -> str | None:
    """Why `model` cannot run a packed layout (block-diagonal mask with explicit positions), or None if it can."""
    from dpo_cli.model.load import backbone_and_head

    backbone, _ = backbone_and_head(model)
    backend = attention_backend(backbone)
    if backend not in MASKABLE_BACKENDS:
        return f"the {backend} attention backend takes no custom attention mask"
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    uses_window = "sliding_attention" in layer_types if layer_types else bool(window)
    if uses_window and window is not None and window < max_length:
        return f"its sliding-window attention ({window} tokens < max_length {max_length}) would be lost under a mask"
    # Models built on transformers' mask helpers use a 4D mask as given; others build their own and may ignore it.
    if not hasattr(sys.modules.get(type(backbone).__module__), "create_causal_mask"):
        return f"{type(backbone).__name__} builds its own attention mask"
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        return f"{type(backbone).__name__} takes no position ids"
    return None


# What `auto` runs when the model can take the mask. Measured on CPU (bench/RESULTS.md, "Batch layouts":
# stories260K 4-bit, HH-RLHF helpful-base at max_length 512, 8 pairs per micro-batch): a micro-batch ran 1.9-2.0x
# as fast as padded in shared-prompt and 1.7-1.8x in packed, with the same losses. Not yet measured on a GPU.
AUTO_LAYOUT = "shared-prompt"


def resolve_layout(requested: str, model, max_length: int) -> tuple[str, str | None]:
    """(the layout to run, a one-line note when it is not the one asked for and why)."""
    if requested not in ("auto", *LAYOUTS):
        raise ValueError(f"unknown layout {requested!r}")
    wanted = AUTO_LAYOUT if requested == "auto" else requested
    if wanted == "padded":
        return "padded", None
    reason = unsupported_reason(model, max_length)
    if reason is not None:
        return "padded", f"layout {requested} runs padded: {reason}"
    return wanted, None
