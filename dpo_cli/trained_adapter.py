"""A folder written by `dpo-cli train`, opened again: its base model, loaded as training loaded it, with the adapter on.

`eval` and `merge-adapter` take only `--adapter DIR`. The saved recipe (DIR/recipe.yaml) says which base the adapter
was trained on and how it was loaded (4-bit or not, compute dtype, device); `--model` overrides the base. Before the
adapter goes on, its weights are checked against the base module by module: PEFT would otherwise stop on a
size-mismatch traceback, or quietly give fresh (zero) LoRA layers to modules the file has no weights for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from dpo_cli.config import RECIPE_FILENAME, Recipe, merge_overrides, read_recipe_file, recipe_from_dict
from dpo_cli.errors import UserError
from dpo_cli.model import load_adapter, load_base_model, load_tokenizer, read_adapter_base, resolve_device

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # the name PEFT gives the one adapter of a folder it loads
_KEY_PREFIX = "base_model.model."


@dataclass
class TrainedAdapter:
    path: Path
    recipe: Recipe
    """The training run's recipe, with model.path replaced by --model when given."""

    @property
    def base_path(self) -> str:
        return self.recipe.model.path


def open_adapter(adapter_dir: Path, model_path: str | None = None, console: Console | None = None) -> TrainedAdapter:
    """The adapter folder and the recipe it was trained with; a folder without recipe.yaml gets the defaults."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: adapter folder not found; pass the --output-dir of a `dpo-cli train` run")
    peft_base = read_adapter_base(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}; the training run did not finish, or this is not its output"
        )
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
    base = model_path or (values.get("model") or {}).get("path") or peft_base
    recipe = recipe_from_dict(merge_overrides(values, {"model": {"path": base}}))
    return TrainedAdapter(adapter_dir, recipe)


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every LoRA pair in the adapter file, read from its header."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():
            name = key.removeprefix(_KEY_PREFIX)
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):  # A: (r, in), B: (out, r)
                if name.endswith(part):
                    module = name.removesuffix(part)
                    shapes.setdefault(module, [0, 0])[1 - dim] = weights.get_slice(key).get_shape()[dim]
    return {module: (in_out[0], in_out[1]) for module, in_out in shapes.items()}


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
    return load_tokenizer(adapter.base_path, adapter.recipe.model.trust_remote_code)


def load_policy(adapter: TrainedAdapter):
    """The PeftModel: base (4-bit unless the recipe says otherwise) + adapter, in eval mode, nothing trainable.

    With its adapters disabled (`dpo_cli.model.reference_mode`) it is the reference.
    """
    config = adapter.recipe.model
    base = load_base_model(config, resolve_device(config.device))
    check_adapter_fits(base, adapter.path, config.path)
    model = load_adapter(base, adapter.path, trainable=False)
    check_no_fresh_layers(model, adapter.path, config.path)
    model.eval()
    return model
