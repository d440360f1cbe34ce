"""`dpo-cli merge-adapter`: fold a LoRA adapter into its base and write a plain Transformers model.

    dpo-cli merge-adapter --adapter runs/happy --output runs/happy-merged --dtype bfloat16

The adapter was trained against the NF4-quantized base, so by default every quantized weight is dequantized with
bitsandbytes' own kernel (the matrix the 4-bit forward multiplies by) and the LoRA update (alpha/r)·B·A is added in
float32: the merged model computes the trained policy. `--base-weights original` adds the same update to the
checkpoint's full-precision weights instead, which differs from the trained policy by NF4's rounding error.

The plain model is the checkpoint loaded in its own dtype; each merged weight replaces its original module by
module, so memory stays near one copy of the model (plus the 4-bit copy). The folder is written under a temporary
name, checked (its logits against the 4-bit base + adapter), and only then renamed into place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory, disk_full_as_user_error, remove_stale_temporaries
from dpo_cli.model.adapter import ADAPTER_NAME, TrainedAdapter, load_base_tokenizer, load_policy, open_adapter
from dpo_cli.model.base_weights import some_keys
from dpo_cli.model.load import load_pretrained
from dpo_cli.output_folder import (
    check_folder_is_ours,
    check_placeable,
    claimed_folder,
    honour_umask,
    is_within,
    mark_folder,
    user_entries,
)

DTYPES = ("bfloat16", "float16", "float32")
BASE_WEIGHTS = ("nf4", "original")
PROBE_SHAPE = (2, 32)  # (rows, tokens) of the self-check batch
PROBE_SEED = 0


@dataclass
class MergeOptions:
    adapter: Path
    output: Path
    overrides: dict[str, dict] = field(default_factory=dict)
    """Recipe settings over the adapter's recipe.yaml, from --model (model.path: another base) and --set."""
    dtype: str = "bfloat16"
    base_weights: str = "nf4"
    force: bool = False
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False
    """From --trust-remote-code on this command line; the adapter's recipe never grants it."""
    shard_bytes: int = field(default=0, init=False)
    """max_shard_size in bytes, set by check()."""

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: not one of {', '.join(DTYPES)}")
        if self.base_weights not in BASE_WEIGHTS:
            raise UserError(f"--base-weights {self.base_weights}: not one of {', '.join(BASE_WEIGHTS)}")
        self.shard_bytes = parse_shard_size(self.max_shard_size)


@dataclass
class MergeResult:
    output: Path
    merged: int
    """Weights with the LoRA update added."""
    dequantized: int
    """NF4 weights written out dequantized."""
    max_abs_logit_diff: float
    """Merged model (as written) against the 4-bit base + adapter, on the probe batch."""
    dtype: str
    base_quantized: bool
    """The adapter was trained on a 4-bit base (its recipe's model.quantize)."""
    base_weights: str
    """nf4 or original: which base weights the update was added to."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_shard_size(text: str) -> int:
    """ "5GB" -> 5_000_000_000 (the units Hugging Face's sharding reads); checked before any model loads."""
    match = _SIZE.match(text)
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) and match.group(2).upper()]) if match else 0
    if size <= 0:
        raise UserError(f"--max-shard-size {text}: not a size; use a number and a unit, e.g. 5GB, 500MB or 100KB")
    return size


def check_output_dir(output: Path, adapter_dir: Path, base_path: str, force: bool) -> None:
    """--output may be new, empty, or (with --force) an earlier merge-adapter output; never an input's folder."""
    check_placeable(output, "--output")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: exists and is not a folder; pick another path")
    if is_within(output, adapter_dir) or is_within(adapter_dir, output):
        raise UserError(f"--output {output}: would replace the adapter folder {adapter_dir}; pick another folder")
    base = Path(base_path)
    if base_path and base.is_dir() and (is_within(output, base) or is_within(base, output)):
        raise UserError(f"--output {output}: would replace the base model's folder {base_path}; pick another folder")
    replace_hint = " or replaces (with --force) an earlier merge-adapter output; pick another folder"
    check_folder_is_ours(output, "merge", "--output", replace_hint)
    if output.is_dir() and user_entries(output) and not force:
        raise UserError(f"--output {output}: folder is not empty; pass --force to replace it, or pick another folder")


def is_4bit(linear) -> bool:
    return getattr(linear.weight, "quant_state", None) is not None


def dequantized(linear) -> torch.Tensor:
    """The float32 matrix a bitsandbytes Linear4bit multiplies by."""
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()


def check_plain_lora(policy, adapter_dir: Path) -> None:
    """Only plain LoRA is folded below; DoRA magnitudes or whole trained modules would be silently dropped."""
    config = policy.peft_config[ADAPTER_NAME]
    extras = {
        "use_dora": getattr(config, "use_dora", False),
        "modules_to_save": getattr(config, "modules_to_save", None),
        "trainable_token_indices": getattr(config, "trainable_token_indices", None),
        "lora_bias": getattr(config, "lora_bias", False),
    }
    used = [key for key, value in extras.items() if value]
    if used:
        raise UserError(
            f"{adapter_dir}: adapter_config.json sets {', '.join(used)}; merge-adapter folds plain LoRA only"
        )


def fold_adapter(policy, plain, base_weights: str) -> tuple[int, int]:
    """Put into `plain` (same architecture, full weights) what the policy computes; returns (merged, dequantized)."""
    from peft.tuners.lora import LoraLayer

    source_model = policy.get_base_model()
    merged = dequantized_count = 0
    for name, target in plain.named_modules():
        if not isinstance(target, torch.nn.Linear):
            continue
        source = source_model.get_submodule(name)
        delta = None
        if isinstance(source, LoraLayer):
            delta = source.get_delta_weight(ADAPTER_NAME).float().cpu()  # (out, in)
            source = source.base_layer
        from_nf4 = base_weights == "nf4" and is_4bit(source)
        if delta is None and not from_nf4:
            continue  # neither adapted nor quantized: the checkpoint's weight is already what the policy used
        weight = dequantized(source).cpu() if from_nf4 else target.weight.detach().float()
        if delta is not None:
            weight = weight + delta
            merged += 1
        dequantized_count += from_nf4
        target.weight = torch.nn.Parameter(weight.to(target.weight.dtype), requires_grad=False)
    return merged, dequantized_count


def load_plain_base(adapter: TrainedAdapter):
    """The checkpoint in its own dtype on the CPU: no quantization, no PEFT."""
    return load_pretrained(adapter.base_path, dtype="auto", trust_remote_code=adapter.trust_remote_code)


def check_finite_weights(model, output: Path) -> None:
    """Nothing is written from a NaN or inf: the merged model would compute NaN, and a merged folder looks final."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise UserError(
            f"--output {output}: not written: {len(bad)} merged weight(s) are not finite (NaN or inf: "
            f"{some_keys(bad)}); check the base model and the adapter, or merge with a wider --dtype"
        )


def check_self_check(diff: float, output: Path) -> None:
    """The merged model's logits must be numbers; the comparison is written so that a NaN fails it (NaN <= x is
    False), never passes it."""
    if not (diff < math.inf):  # `diff >= inf` would let a NaN through
        raise UserError(
            f"--output {output}: not written: the self-check of the merged model gave {diff} (its logits are not "
            "finite numbers); check the base model and the adapter"
        )


def probe_ids(vocab_size: int) -> torch.Tensor:
    """(2, 32) seeded random token ids: logits on them compare two models without any data at hand."""
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


@torch.no_grad()
def logits_on(model, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()  # (B, T, V)


def merged_logit_diff(folder: Path, dtype: str, policy_logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Max |logit| difference of the model as written in `folder` against the policy's logits; NaN if any is."""
    merged = load_pretrained(str(folder), dtype=getattr(torch, dtype))
    difference = (logits_on(merged, input_ids) - policy_logits).abs()
    return math.nan if bool(difference.isnan().any()) else float(difference.max())


def remove_stale_merge_temporaries(output: Path) -> None:
    """What a merge into `output` that was killed left beside it: `.{name}.{pid}.*.tmp`, as large as the model."""
    output = Path(output)
    remove_stale_temporaries(output.parent, re.escape(output.name))


def merge_adapter(options: MergeOptions, console: Console) -> MergeResult:
    """Merge, write and self-check; `console` gets only the notes on the way, the command prints the result."""
    options.check()
    adapter = open_adapter(options.adapter, None, console, options.trust_remote_code, options.overrides)
    check_output_dir(Path(options.output), adapter.path, adapter.base_path, options.force)
    if options.base_weights == "nf4" and not adapter.recipe.model.quantize:
        console.print("the adapter was trained on an unquantized base: merging into its original weights")
    with claimed_folder(Path(options.output), "merge", "--output"):  # a second merge into it refuses meanwhile
        remove_stale_merge_temporaries(Path(options.output))
        diff, merged, dequantized_count = _merge_into(adapter, options)
    quantized = adapter.recipe.model.quantize
    return MergeResult(
        Path(options.output), merged, dequantized_count, diff, options.dtype, quantized, options.base_weights
    )


def _merge_into(adapter: TrainedAdapter, options: MergeOptions) -> tuple[float, int, int]:
    """Load, fold, write under a temporary name, check, rename over --output; (logit diff, merged, dequantized)."""
    tokenizer = load_base_tokenizer(adapter)
    policy = load_policy(adapter)
    check_plain_lora(policy, adapter.path)
    input_ids = probe_ids(policy.config.vocab_size)
    policy_logits = logits_on(policy, input_ids)
    plain = load_plain_base(adapter)
    merged, dequantized_count = fold_adapter(policy, plain, options.base_weights)
    plain.to(getattr(torch, options.dtype))
    check_finite_weights(plain, options.output)  # after the cast: a weight beyond float16's range becomes inf
    with (
        disk_full_as_user_error(f"the merged model into {options.output}", "rerun merge-adapter"),
        atomic_directory(Path(options.output), replace=True, owner_in_name=True) as staging,
    ):
        plain.save_pretrained(staging, max_shard_size=options.shard_bytes)
        tokenizer.save_pretrained(staging)
        mark_folder(staging, "merge")
        honour_umask(staging)
        del plain  # the check reads the files back; keep one copy of the weights in memory
        diff = merged_logit_diff(staging, options.dtype, policy_logits, input_ids)
        check_self_check(diff, options.output)  # inside: a failed check removes the staging folder
    return diff, merged, dequantized_count
