"""Which batch layout a loaded model can run: its attention backend, and whether that backend takes a custom mask.

The packed layouts need a block-diagonal mask with explicit positions (dpo/attention.py builds it). Other backends
(flash-attention's padded kernels, paged attention) take no such mask, and a sliding window shorter than a sequence
would be lost under a custom mask: `unsupported_reason` says so, and the layout falls back to padded.
"""

from __future__ import annotations

import inspect
import sys

from dpo_cli.dpo.attention import MASKABLE_BACKENDS
from dpo_cli.dpo.layouts import LAYOUTS
from dpo_cli.model.load import attention_backend, backbone_and_head


def unsupported_reason(model, max_length: int) -> str | None:
    """Why `model` cannot run a packed layout (block-diagonal mask with explicit positions), or None if it can."""
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
