"""Starting DPO from an adapter (`train --from-adapter DIR`): which weights are the policy, which the reference.

DPO's reference is the model the run starts from. Without `--from-adapter` that is the base, and the reference is
the policy with its adapter disabled (`load.reference_mode`). Started from an SFT adapter, disabling the adapter
would give the *bare base*, not the SFT model: the trap LLaMA-Factory users fell into. So here:
- the policy's LoRA weights (PEFT adapter "default", built from the recipe's `lora` section) start as DIR's;
- the reference adapter, DIR's by default, is loaded a second time as the frozen adapter `REFERENCE_ADAPTER`
  ("reference"), and `load.reference_mode` switches the active adapter to it (and back) for the reference pass,
  under no_grad.
`model.reference_adapter` (config.reference_adapter_of) names another reference: `base` (no reference adapter, so
`reference_mode` disables every adapter: the bare base), or another adapter folder (iterate --reference initial:
the policy starts from round r-1's adapter, the reference stays round 1's). The reference cache, `--resume` and
OUTPUT/reference-adapter/ all follow the reference, whichever it is.
Its parameters never require grad, so they are neither in the optimizer nor DDP parameters, and the checkpoints and
the final adapter hold the policy only (`save_policy`).

`check_start_adapter` refuses, in one line and before any model loads, what cannot be both the starting point and the
reference: a DoRA adapter, one with modules_to_save or trained biases (parts of the model outside LoRA), rsLoRA or
per-module rank/alpha patterns, a rank, alpha or module set other than the recipe's, an adapter for another base (by
name, loosely), non-finite weights. `start_from_adapter` then checks the tensor shapes strictly against the loaded
base. `adapter_content_sha256` is what the reference cache and `--resume` know the adapter by: its content, not its
path. A run keeps a byte-for-byte copy in OUTPUT/reference-adapter/ (`save_reference_copy`), so `eval --adapter RUN`
scores against the same reference wherever the folder goes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from dpo_cli.config import REFERENCE_COPY, LoraSection, reference_adapter_of
from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory
from dpo_cli.model.adapter import (
    ADAPTER_NAME,
    ADAPTER_WEIGHTS,
    TrainedAdapter,
    adapter_shapes,
    check_adapter_fits,
    check_adapter_folder,
    load_policy,
)
from dpo_cli.model.load import REFERENCE_ADAPTER
from dpo_cli.output_folder import honour_umask

POLICY_ADAPTER = ADAPTER_NAME
"""The trained adapter's PEFT name ("default"): what checkpoints, the final adapter and merge-adapter hold."""
ADAPTER_CONFIG = "adapter_config.json"
HASH_CHUNK = 1 << 22
REFERENCE_DIGEST_ATTRIBUTE = "dpo_cli_reference_sha256"
"""Set on a model that carries a reference adapter: its `adapter_content_sha256` (reference cache fingerprint)."""


def check_start_adapter(adapter_dir: Path, lora: LoraSection, base_path: str, flag: str = "--from-adapter") -> None:
    """One line if `adapter_dir` cannot start this run or be its reference (`flag` names which it was given as);
    reads only the small files' headers and the adapter's weights (small), no model."""
    adapter_dir = Path(adapter_dir)
    where = f"{flag} {adapter_dir}"
    config = check_adapter_folder(
        adapter_dir,
        where,
        not_found="pass the output folder of `dpo-cli sft` or a PEFT adapter",
        no_weights="an adapter_model.bin is never unpickled: save the adapter with safetensors (PEFT's default)",
        damaged_weights="the adapter is damaged or its training diverged",
    )
    _refuse_unsupported_kind(where, config)
    _refuse_other_lora_shape(where, config, lora)
    _refuse_other_base(where, config, base_path)
    other = {module: rank for module, rank in _file_ranks(adapter_dir).items() if rank != lora.r}
    if other:
        module, rank = next(iter(other.items()))
        raise UserError(f"{where}: {module} has rank {rank} in the adapter, the recipe's lora.r is {lora.r}; {_FIX}")


_FIX = "set the recipe's lora section to the adapter's (e.g. --set lora.r=R --set lora.alpha=A)"


def _refuse_unsupported_kind(where: str, config: dict) -> None:
    """Adapters whose reference could not be rebuilt as a plain frozen LoRA adapter beside the policy's."""
    if config.get("use_dora"):
        raise UserError(f"{where}: a DoRA adapter (use_dora: true); --from-adapter takes plain LoRA adapters only")
    if config.get("modules_to_save"):
        raise UserError(
            f"{where}: the adapter also trains whole modules (modules_to_save: {config['modules_to_save']}), which "
            "a frozen reference copy cannot hold; use a LoRA-only adapter"
        )
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: the adapter trains biases (bias: {config['bias']!r}); use a LoRA-only adapter")
    if config.get("use_rslora"):
        raise UserError(f"{where}: an rsLoRA adapter (use_rslora: true); --from-adapter takes plain LoRA scaling only")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UserError(f"{where}: per-module ranks or alphas ({key}); --from-adapter needs one rank and alpha")


def _refuse_other_lora_shape(where: str, config: dict, lora: LoraSection) -> None:
    if config["r"] != lora.r or float(config["lora_alpha"]) != float(lora.alpha):
        raise UserError(
            f"{where}: the adapter has r={config['r']}, alpha={config['lora_alpha']}, the recipe's lora section "
            f"r={lora.r}, alpha={lora.alpha}; set them to the adapter's "
            f"(--set lora.r={config['r']} --set lora.alpha={config['lora_alpha']})"
        )


def _base_name(path: str) -> str:
    return Path(path.rstrip("/")).name.lower()


def _refuse_other_base(where: str, config: dict, base_path: str) -> None:
    """By name, loosely: the same folder, or the same last path part (a hub id and its local copy agree)."""
    trained_on = config.get("base_model_name_or_path") or ""
    if not trained_on or not base_path:
        return
    same_folder = Path(trained_on).expanduser().exists() and Path(base_path).expanduser().exists()
    if same_folder and Path(trained_on).expanduser().resolve() == Path(base_path).expanduser().resolve():
        return
    if _base_name(trained_on) == _base_name(base_path):
        return
    raise UserError(
        f"{where}: adapter is for another base ({trained_on}), the run's base is {base_path}; pass --model "
        f"{trained_on}, or, if it is the same model under another name, set base_model_name_or_path in its "
        f"{ADAPTER_CONFIG}"
    )


def _file_ranks(adapter_dir: Path) -> dict[str, int]:
    """{module: rank} from the header of the weight file (lora_A is (r, in_features))."""
    from safetensors import safe_open

    suffix = ".lora_A.weight"
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as weights:
        return {
            key.removesuffix(suffix): weights.get_slice(key).get_shape()[0]
            for key in weights.keys()
            if key.endswith(suffix)
        }


def adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error}); the adapter folder is damaged") from None


def adapter_content_sha256(adapter_dir: Path) -> str:
    """sha256 over adapter_config.json's and the weight file's bytes: what the reference is built from."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(name.encode() + b"\0")
        with (Path(adapter_dir) / name).open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def start_from_adapter(model, adapter_dir: Path, base_path: str, reference_dir: Path | None) -> None:
    """Policy ("default", the recipe's LoRA layers) := DIR's weights; `reference_dir`'s adapter (DIR's for a run
    whose reference is where it starts) added, frozen, as the reference; None: the reference is the bare base.
    `model` is the PeftModel `load.add_lora` made; the policy stays the active adapter."""
    adapter_dir = Path(adapter_dir)
    check_adapter_fits(model.get_base_model(), adapter_dir, base_path)
    _refuse_modules_without_weights(model, adapter_dir)
    weights = adapter_weights(adapter_dir)
    _load_into(model, weights, POLICY_ADAPTER, adapter_dir)
    if reference_dir is not None:
        add_reference_adapter(model, reference_dir, weights if Path(reference_dir) == adapter_dir else None, base_path)


def _refuse_modules_without_weights(model, adapter_dir: Path) -> None:
    """The recipe's lora.target_modules adapt no module the adapter has no weights for (it would start at zero)."""
    from peft.tuners.lora import LoraLayer

    in_file = set(adapter_shapes(adapter_dir))
    fresh = [
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and name.removeprefix("base_model.model.") not in in_file
    ]
    if fresh:
        raise UserError(
            f"--from-adapter {adapter_dir}: the recipe's lora.target_modules adapt {len(fresh)} modules the adapter "
            f"has no weights for (first: {fresh[0]}); set lora.target_modules to the adapter's"
        )


def add_reference_adapter(
    model, adapter_dir: Path, weights: dict[str, torch.Tensor] | None = None, base_path: str | None = None
) -> None:
    """DIR's adapter on `model` (a PeftModel) as the frozen adapter REFERENCE_ADAPTER, without dropout; the active
    adapter is left as it was. `base_path`: check first that DIR's tensors fit the loaded base."""
    from peft import LoraConfig

    adapter_dir = Path(adapter_dir)
    if base_path is not None:
        check_adapter_fits(model.get_base_model(), adapter_dir, base_path)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.lora_dropout = 0.0  # the reference is a fixed function of its weights, in train mode too
    config.inference_mode = True
    active = model.active_adapter
    model.add_adapter(REFERENCE_ADAPTER, config)
    _load_into(model, weights if weights is not None else adapter_weights(adapter_dir), REFERENCE_ADAPTER, adapter_dir)
    model.set_adapter(active)  # PEFT marks the adapter it activates trainable: the policy's only
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)
    if not model.training:  # an eval-mode model (eval, merge) trains nothing
        for param in model.parameters():
            param.requires_grad_(False)
    setattr(model, REFERENCE_DIGEST_ATTRIBUTE, adapter_content_sha256(adapter_dir))


def _load_into(model, weights: dict[str, torch.Tensor], adapter_name: str, adapter_dir: Path) -> None:
    """DIR's weights into adapter `adapter_name`: every LoRA weight of that adapter set, nothing left over."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_keys = getattr(result, "missing_keys", []) or []
    missing = [key for key in missing_keys if f".{adapter_name}." in key and "lora_" in key]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise UserError(
            f"--from-adapter {adapter_dir}: the adapter does not fit the recipe's lora section "
            f"({'unexpected' if unexpected else 'missing'} weight {example}); {_FIX}"
        )


def save_policy(model, folder: Path, state_dict: dict | None = None) -> None:
    """The policy adapter only, as a PEFT adapter folder (PEFT would save every adapter, the reference in a
    subfolder). `state_dict`: the weights gathered from a sharded model; None: read off the model."""
    model.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER], state_dict=state_dict)


def reference_digest(model) -> str | None:
    """The content sha256 of `model`'s reference adapter, or None when its reference is the bare base."""
    return getattr(model, REFERENCE_DIGEST_ATTRIBUTE, None)


def save_reference_copy(adapter_dir: Path, output_dir: Path) -> Path:
    """OUTPUT/reference-adapter/: DIR's config and weights byte for byte (so their content hash is DIR's), written
    atomically; an existing copy (a resumed run) is replaced."""
    target = Path(output_dir) / REFERENCE_COPY
    with atomic_directory(target, replace=True, owner_in_name=True) as staging:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(Path(adapter_dir) / name, staging / name)
        honour_umask(staging)
    return target


def reference_copy_of(run_dir: Path) -> Path | None:
    """A run folder's copy of its reference adapter, if it has one."""
    copy = Path(run_dir) / REFERENCE_COPY
    return copy if (copy / ADAPTER_CONFIG).is_file() else None


def load_policy_and_reference(adapter: TrainedAdapter):
    """`adapter.load_policy`, plus, for a run whose reference was an adapter (`--from-adapter`'s, or
    model.reference_adapter's), its copy of that adapter as the frozen reference; else the reference is the bare
    base (the adapter disabled). The copy is checked before the base loads."""
    reference = reference_adapter_of(adapter.recipe.model)
    copy = reference_copy_of(adapter.path) if reference else None
    if reference and copy is None:
        key = "model.from_adapter" if reference == adapter.recipe.model.from_adapter else "model.reference_adapter"
        raise UserError(
            f"{adapter.path}: the run's reference was the adapter {reference} ({key}), but the run has no "
            f"{REFERENCE_COPY}/ folder holding it; copy the whole run folder, or evaluate a run folder that has it"
        )
    if copy is not None:
        check_start_adapter(copy, adapter.recipe.lora, adapter.base_path)
    model = load_policy(adapter)
    if copy is not None:
        add_reference_adapter(model, copy)
    return model
