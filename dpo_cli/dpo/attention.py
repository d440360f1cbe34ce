"""The attention mask a packed batch needs, in the form the model's attention backend takes.

A packed row holds several sequences (or a pair's shared prompt and its two branches), so attention must be
block-diagonal causal, not causal over the row. Restarting `position_ids` per sequence does not do that under sdpa
(measured: logits off by 3.5), so the mask is always explicit:
- sdpa: a 4D boolean mask (True = may attend), which transformers passes through as given;
- eager: the same mask as an additive float mask (eager adds it to the scores, so a boolean would be wrong);
- flex_attention: a `BlockMask` built from the same rule, which skips fully masked blocks (the GPU path).
Which backend a model runs, and whether it can take such a mask at all, is the model's business:
model/attention_support.py decides the layout, and hands the backend's name here.
"""

from __future__ import annotations

import torch

from dpo_cli.dpo.layouts import SHARED, PreferenceBatch

MASKABLE_BACKENDS = ("sdpa", "eager", "flex_attention")


def model_attention_mask(batch: PreferenceBatch, backend: str, float_dtype: torch.dtype = torch.float32):
    """What to pass as the backbone's `attention_mask` for `batch`: the 2D padding mask of a padded batch, else the
    batch's block mask in the form `backend` takes (`float_dtype`: the additive mask's, eager's scores' dtype)."""
    if not batch.is_packed:
        return batch.attention_mask
    if backend == "flex_attention":
        return flex_block_mask(batch)
    allowed = batch.attention_allowed()[:, None]  # (R, 1, T, T): one mask for every head
    if backend == "sdpa":
        return allowed
    if backend == "eager":
        dtype = float_dtype if float_dtype.is_floating_point else torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
    # model/attention_support keeps packed batches away from any other backend; reaching here is a bug
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
