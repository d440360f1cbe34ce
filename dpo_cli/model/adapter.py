"""A folder written by `dpo-cli train`, opened again: its base model, loaded as training loaded it, with the adapter on.

`eval` and `merge-adapter` take only `--adapter DIR`. The saved recipe (DIR/recipe.yaml) says which base the adapter
was trained on and how it was loaded (4-bit or not, compute dtype, device); `--model` overrides the base. Before the
adapter goes on, its weights are checked against the base module by module: PEFT would otherwise stop on a
size-mismatch traceback, or quietly give fresh (zero) LoRA layers to modules the file has no weights for. Before
any model loads, the file itself is checked (`check_adapter_weights`): only LoRA matrices of the configured rank,
floats, and no NaN or inf, which would turn every metric and merged weight into NaN without a word.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from dpo_cli.config import RECIPE_FILENAME, Recipe, merge_overrides, read_recipe_file, recipe_from_dict
from dpo_cli.errors import UserError, shown
from dpo_cli.model.base_weights import FLOAT_DTYPES, short, some_keys
from dpo_cli.model.load import (
    IGNORED_RECIPE_TRUST,
    load_adapter,
    load_base_model,
    load_tokenizer,
    read_adapter_base,
    read_adapter_config,
    resolve_device,
)
from dpo_cli.output_folder import file_above

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # the name PEFT gives the one adapter of a folder it loads
_KEY_PREFIX = "base_model.model."
DAMAGED = "the adapter folder is damaged"
# LoRA switches PEFT reads as true/false; a string there ("yes") is truthy to PEFT and fails deep inside it.
_FLAGS = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "inference_mode", "use_qalora")


@dataclass
class TrainedAdapter:
    path: Path
    recipe: Recipe
    """The training run's recipe, with model.path replaced by --model when given."""
    trust_remote_code: bool = False
    """Granted by --trust-remote-code on this command line only; the recipe's key is ignored."""

    @property
    def base_path(self) -> str:
        return self.recipe.model.path


def open_adapter(
    adapter_dir: Path,
    model_path: str | None = None,
    console: Console | None = None,
    trust_remote_code: bool = False,
    overrides: dict[str, dict] | None = None,
) -> TrainedAdapter:
    """The adapter folder and the recipe it was trained with; a folder without recipe.yaml gets the defaults.

    `overrides` ({section: {key: value}}, from a command's flags and --set) go over the saved recipe; a model.path
    among them, or `model_path`, names another base.

    Both files are checked here, before any model loads: a damaged adapter costs milliseconds, not a model load.
    """
    adapter_dir = Path(adapter_dir)
    check_adapter_folder(
        adapter_dir,
        str(adapter_dir),
        not_found="pass the --output-dir of a `dpo-cli train` run",
        no_weights="the training run did not finish, or this is not its output",
    )
    peft_base = read_adapter_base(adapter_dir)
    recipe_path = adapter_dir / RECIPE_FILENAME
    if recipe_path.is_file():
        values = read_recipe_file(recipe_path)
    else:
        values = {}
        if console is not None:
            console.print(
                f"[yellow]{adapter_dir}: no {RECIPE_FILENAME}; assuming a 4-bit base and the default DPO settings"
                "[/yellow]"
            )
    values = merge_overrides(values, overrides or {})
    base = model_path or (values.get("model") or {}).get("path") or peft_base
    recipe = recipe_from_dict(merge_overrides(values, {"model": {"path": base}}))
    if recipe.model.trust_remote_code and not trust_remote_code and console is not None:
        console.print(f"[yellow]{adapter_dir / RECIPE_FILENAME}: {IGNORED_RECIPE_TRUST}[/yellow]")
    return TrainedAdapter(adapter_dir, recipe, trust_remote_code)


def check_adapter_folder(
    adapter_dir: Path, where: str, not_found: str, no_weights: str, damaged_weights: str | None = None
) -> dict:
    """What every adapter folder is checked for before a model loads, each in one line starting with `where`: the
    folder exists, adapter_config.json is a sane LoRA config, adapter_model.safetensors is there and holds LoRA
    weights, all finite. The hints say what to do in the caller's terms. Returns the config."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        blocker = file_above(adapter_dir)
        why = "not found" if blocker is None else f"not found ({blocker} is a file)"
        raise UserError(f"{where}: adapter folder {why}; {not_found}")
    config = read_adapter_config(adapter_dir)
    check_adapter_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{where}: no {ADAPTER_WEIGHTS}; {no_weights}")
    if not adapter_shapes(adapter_dir):
        raise UserError(f"{adapter_dir / ADAPTER_WEIGHTS}: holds no LoRA weights; the adapter folder is damaged")
    if damaged_weights is None:
        check_adapter_weights(adapter_dir)
    else:
        check_adapter_weights(adapter_dir, what_to_do=damaged_weights)
    return config


def check_adapter_config(adapter_dir: Path) -> None:
    """The keys PEFT needs to rebuild a LoRA adapter are there and sane; anything else is a damaged file."""
    config = read_adapter_config(adapter_dir)
    where = f"{Path(adapter_dir) / 'adapter_config.json'}"
    if config.get("peft_type") != "LORA":
        peft_type = shown(config.get("peft_type"))
        raise UserError(f"{where}: peft_type is {peft_type}, not 'LORA'; this is not a LoRA adapter")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UserError(f"{where}: key r is {shown(rank)}, not a positive integer; the adapter folder is damaged")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or alpha <= 0:
        damaged = "the adapter folder is damaged"
        raise UserError(f"{where}: key lora_alpha is {shown(alpha)}, not a positive number; {damaged}")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise UserError(f"{where}: key target_modules is {shown(targets)}; the adapter folder is damaged")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise UserError(f"{where}: key lora_dropout is {shown(dropout)}, not a number in [0, 1); {DAMAGED}")
    for key in _FLAGS:
        if not isinstance(config.get(key, False), bool):
            raise UserError(f"{where}: key {key} is {shown(config[key])}, not true or false; {DAMAGED}")


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every LoRA pair in the adapter file, read from its header."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    shapes: dict[str, list[int]] = {}
    try:
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                name = key.removeprefix(_KEY_PREFIX)
                for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):  # A: (r, in), B: (out, r)
                    if name.endswith(part):
                        module = name.removesuffix(part)
                        shapes.setdefault(module, [0, 0])[1 - dim] = weights.get_slice(key).get_shape()[dim]
    except (SafetensorError, OSError) as error:  # empty, truncated, or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file ({error}); the adapter folder is damaged") from None
    return {module: (in_out[0], in_out[1]) for module, in_out in shapes.items()}


def check_adapter_weights(adapter_dir: Path, what_to_do: str = "the adapter folder is damaged") -> None:
    """The adapter file holds what PEFT will load, and only numbers: every key a LoRA A or B weight, floats, each
    module's A and B of one rank (adapter_config.json's r), and every value finite. A NaN or inf would make every
    log-prob, metric and merged weight NaN without a word; a rank that is not the file's would make PEFT allocate
    r x in_features before it failed. Every command that loads an adapter goes through here first (eval,
    merge-adapter, train --resume); the file is read one tensor at a time (LoRA weights are small)."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    not_finite = []
    try:
        with safe_open(str(path), framework="pt") as weights:
            _check_lora_layout(path, {key: weights.get_slice(key) for key in weights.keys()}, adapter_dir, what_to_do)
            for key in weights.keys():
                if not bool(torch.isfinite(weights.get_tensor(key)).all()):
                    not_finite.append(key.removeprefix(_KEY_PREFIX))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({short(error)}); {what_to_do}") from None
    if not_finite:
        raise UserError(
            f"{path}: {len(not_finite)} weight(s) are not finite (NaN or inf: {some_keys(not_finite)}); {what_to_do}"
        )


_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _check_lora_layout(path: Path, slices: dict, adapter_dir: Path, what_to_do: str) -> None:
    """Keys, dtypes and ranks of the file's tensors, from its header alone."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = read_adapter_config(adapter_dir) if config_file.is_file() else {}
    rank = config.get("r") if not config.get("rank_pattern") else None  # per-module ranks: pairs checked alone
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in slices.items():
        match = _LORA_WEIGHT.match(key)
        shape = tensor.get_shape()
        if match is None or len(shape) != 2:
            raise UserError(f"{path}: {short(key)} is not a LoRA A or B matrix; {what_to_do}")
        if tensor.get_dtype() not in FLOAT_DTYPES:
            raise UserError(f"{path}: {short(key)} holds {tensor.get_dtype()}, not floating point; {what_to_do}")
        part = match.group("part")
        ranks.setdefault(match.group("module"), {})[part] = shape[0] if part == "A" else shape[1]
    for module, pair in ranks.items():
        name = module.removeprefix(_KEY_PREFIX)
        if len(pair) != 2:
            raise UserError(f"{path}: {name} has a lora_{'B' if 'A' in pair else 'A'} matrix missing; {what_to_do}")
        if pair["A"] != pair["B"]:
            ranks_seen = f"lora_A of rank {pair['A']} but lora_B of rank {pair['B']}"
            raise UserError(f"{path}: {name} has {ranks_seen}; {what_to_do}")
        if rank is not None and pair["A"] != rank:
            raise UserError(
                f"{path}: {name} has LoRA rank {pair['A']}, adapter_config.json says r={short(rank)}; {what_to_do}"
            )


def check_adapter_fits(base_model, adapter_dir: Path, base_path: str) -> None:
    """Every module the adapter file adapts exists in the base with the same in/out features."""
    hint = f"pass --model with the base it was trained on ({read_adapter_base(adapter_dir) or 'see its recipe'})"
    for module_name, (in_features, out_features) in adapter_shapes(adapter_dir).items():
        try:
            module = base_model.get_submodule(module_name)
        except AttributeError:
            raise UserError(
                f"{adapter_dir}: adapter is for another base: it adapts {module_name}, which {base_path} lacks; {hint}"
            ) from None
        have = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if have != (in_features, out_features):
            raise UserError(
                f"{adapter_dir}: adapter is for another base: {module_name} is {in_features}->{out_features} in the "
                f"adapter but {have[0]}->{have[1]} in {base_path}; {hint}"
            )


def check_no_fresh_layers(model, adapter_dir: Path, base_path: str) -> None:
    """PEFT adapts every module whose name matches target_modules; each must have had weights in the file."""
    from peft.tuners.lora import LoraLayer

    in_file = set(adapter_shapes(adapter_dir))
    fresh = [
        name.removeprefix(_KEY_PREFIX)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and name.removeprefix(_KEY_PREFIX) not in in_file
    ]
    if fresh:
        raise UserError(
            f"{adapter_dir}: adapter is for another base: {base_path} has {len(fresh)} adapted modules the adapter has "
            f"no weights for (first: {fresh[0]}); pass --model with the base it was trained on"
        )


def load_base_tokenizer(adapter: TrainedAdapter):
    """The base model's tokenizer, set up as training set it up (pad token included)."""
    return load_tokenizer(adapter.base_path, adapter.trust_remote_code)


def load_policy(adapter: TrainedAdapter):
    """The PeftModel: base (4-bit unless the recipe says otherwise) + adapter, in eval mode, nothing trainable.

    With its adapters disabled (`dpo_cli.model.load.reference_mode`) it is the reference.
    """
    config = adapter.recipe.model
    base = load_base_model(config, resolve_device(config.device), adapter.trust_remote_code)
    check_adapter_fits(base, adapter.path, config.path)
    model = load_adapter(base, adapter.path, trainable=False)
    check_no_fresh_layers(model, adapter.path, config.path)
    model.eval()
    return model
