"""A base model's weight files checked against its config.json before a single weight is allocated.

Transformers builds the model the config describes and fills it from the weight files: a weight the files lack is
initialised at random (and only logged, at a level dpo-cli turns down), a weight of another shape stops it after the
allocation with a long traceback, and under 4-bit loading a missing layer fails deep inside bitsandbytes. Here the
model is first built on the meta device (shapes only, no memory) and compared with the safetensors headers (read
without loading a tensor), using transformers' own key renamings; any weight missing, unexpected, of another shape
or not a float is one line naming the folder, a few of the keys and their count.

After the real load `check_loading_info` applies the same rule to what transformers itself reports, so a format the
headers cannot show (a `.bin` checkpoint, a hub id not cached yet, a pre-quantized checkpoint) is held to it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from dpo_cli.errors import UserError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
KEYS_SHOWN = 3
# A decoder layer holds at least one weight: more layers than weights in the files cannot be real, and building a
# billion (meta) layers would itself take minutes, so that count is refused before the model is built.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
ERROR_CHARS = 200
FINITE_CHUNK = 1 << 26  # elements checked at once: the boolean mask of an 8B model's embedding would be 0.5 GB


def short(text: object) -> str:
    """`text` on one line, at most ERROR_CHARS characters: an error line never carries a whole file."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= ERROR_CHARS else flat[: ERROR_CHARS - 3] + "..."


def some_keys(keys: Iterable[str]) -> str:
    """'a, b, c and 24 more' (sorted), for an error line."""
    ordered = sorted(keys)
    shown = ", ".join(ordered[:KEYS_SHOWN])
    more = len(ordered) - KEYS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def local_model_folder(path: str) -> Path | None:
    """The folder holding the model's files: `path` itself, or a hub id's cached snapshot; None when not local."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(path, "config.json")
    except ValueError:  # not a valid hub id either: transformers says so when it loads
        return None
    return Path(config).parent if isinstance(config, str) else None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would read from `folder`; [] when it holds none (a `.bin` checkpoint)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            names = sorted({str(name) for name in names})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(
                f"{index}: not a readable weight index ({short(error)}); the model folder is damaged"
            ) from None
        for name in names:
            if Path(name).name != name or not (folder / name).is_file():
                raise UserError(
                    f"{index}: names {short(name)!r}, which is not a file in {folder}; the folder is damaged"
                )
        return [folder / name for name in names]
    single = folder / SAFETENSORS_FILE
    return [single] if single.is_file() else []


def read_headers(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} of every tensor in the files, read from their headers only (no tensor is loaded).

    safetensors checks each header against its file (offsets within the file, size = shape x dtype), so a header
    claiming a tensor larger than the file is refused here in microseconds."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():
                    tensor = weights.get_slice(key)
                    found[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
        except (SafetensorError, OSError) as error:
            raise UserError(
                f"{file}: not a readable safetensors file ({short(error)}); the model folder is damaged"
            ) from None
    return found


def meta_model(config, trust_remote_code: bool):
    """The model `config` describes, on the meta device: every parameter's shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def expected_keys(model, checkpoint_keys: Iterable[str]) -> tuple[dict[str, str], set[str], set[str]]:
    """({checkpoint key: model key} of the keys loaded as they are, unexpected keys, missing keys), matched as
    transformers' loader matches them (its renamings, then its converters).

    A key the model's conversion mapping fuses or splits (MoE experts) counts as loaded but is left out of the first
    mapping: its shape is the converter's business, so the caller compares shapes only for keys loaded as they are."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.utils.loading_report import LoadStateDictInfo

    state = model.state_dict()
    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    loaded: dict[str, str] = {}
    plain: dict[str, str] = {}
    unexpected: set[str] = set()
    for key in checkpoint_keys:
        target, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if target not in state and key in state:
            target, converter = key, None
        if target in state:
            loaded[key] = target
            if converter is None:
                plain[key] = target
        else:
            unexpected.add(key)
    missing = set(state) - set(loaded.values()) - set(getattr(model, "all_tied_weights_keys", {}) or {})
    info = LoadStateDictInfo(
        missing_keys=missing,
        unexpected_keys=unexpected,
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    model._adjust_missing_and_unexpected_keys(info)  # the model's own "may be absent" rules, as from_pretrained does
    return plain, info.unexpected_keys, info.missing_keys


def load_config(path: str, trust_remote_code: bool):
    """config.json as transformers reads it, or one line saying why it cannot describe a model."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise  # the caller says what --trust-remote-code is for
        raise UserError(f"{path}/config.json: not a model config transformers can read ({short(error)})") from None
    except (StrictDataclassError, TypeError, KeyError, AttributeError, ArithmeticError) as error:
        raise UserError(f"{path}/config.json: not a model config transformers can read ({short(error)})") from None


def _check_layer_counts(path: str, config, tensor_count: int) -> None:
    for values in (config.to_dict(), config.get_text_config().to_dict()):
        for key in LAYER_COUNT_KEYS:
            count = values.get(key)
            if isinstance(count, int) and count > tensor_count:
                raise UserError(
                    f"{path}: config.json has {key} {count}, but the weight files hold only {tensor_count} tensors; "
                    "the config does not describe these weights"
                )


def check_weights_match_config(path: str, trust_remote_code: bool = False) -> None:
    """Refuse, in one line and before any weight is allocated, weight files that do not fill the model the config
    describes: missing or unexpected weights, other shapes, weights that are not floats, unreadable headers.

    A folder without safetensors files, or a hub id not in the local cache, is checked by `check_loading_info`
    after loading instead."""
    folder = local_model_folder(path)
    files = weight_files(folder) if folder is not None else []
    if not files:
        return
    headers = read_headers(files)
    config = load_config(str(folder), trust_remote_code)
    if getattr(config, "quantization_config", None):  # stored 4-bit/8-bit: keys and shapes are the quantizer's
        return
    _check_layer_counts(path, config, len(headers))
    try:
        model = meta_model(config, trust_remote_code)
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError, IndexError, ArithmeticError) as error:
        raise UserError(
            f"{path}/config.json: transformers cannot build the model it describes ({short(error)})"
        ) from None
    plain, unexpected, missing = expected_keys(model, headers)
    refuse_unloaded(path, missing, unexpected)
    state = model.state_dict()
    mismatched = [key for key, target in plain.items() if headers[key][1] != tuple(state[target].shape)]
    if mismatched:
        key = sorted(mismatched)[0]
        example = f"{key} is {list(headers[key][1])} in the weight files, {list(state[plain[key]].shape)} by the config"
        raise UserError(
            f"{path}: {len(mismatched)} weight(s) have another shape than config.json describes "
            f"({some_keys(mismatched)}; {example}); the config does not describe these weights"
        )
    not_float = [
        key
        for key, target in plain.items()
        if headers[key][0] not in FLOAT_DTYPES and state[target].is_floating_point()
    ]
    if not_float:
        key = sorted(not_float)[0]
        raise UserError(
            f"{path}: {len(not_float)} weight(s) are not floating point ({some_keys(not_float)}; {key} is "
            f"{headers[key][0]}); the model folder is damaged"
        )


def refuse_unloaded(path: str, missing: set[str], unexpected: set[str]) -> None:
    """One line for weights the model needs and the files lack, or weights the files hold and the model has no
    place for: either way the model would not be the one the files were saved from."""
    if missing:
        raise UserError(
            f"{path}: config.json describes {len(missing)} weight(s) missing from the weight files "
            f"({some_keys(missing)}); they would start from random values, so the model is refused"
        )
    if unexpected:
        raise UserError(
            f"{path}: the weight files hold {len(unexpected)} weight(s) the model config.json describes has no place "
            f"for ({some_keys(unexpected)}); the config does not describe these weights, so the model is refused"
        )


def check_loading_info(path: str, info: dict) -> None:
    """What `from_pretrained(..., output_loading_info=True)` reported, held to the rule above."""
    refuse_unloaded(path, set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ()))
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        names = [entry[0] for entry in mismatched]
        raise UserError(
            f"{path}: {len(names)} weight(s) have another shape than config.json describes ({some_keys(names)}); "
            "the config does not describe these weights"
        )


def is_loading_report_error(error: RuntimeError) -> bool:
    """Transformers' own refusal of weights that do not fit (it raises after its load report), not a bug or OOM."""
    text = str(error)
    signs = ("Error(s) in loading state_dict", "ignore_mismatched_sizes", "automatic conversion of the weights")
    return any(sign in text for sign in signs)


def _all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.detach().reshape(-1)
    chunks = range(0, flat.numel(), FINITE_CHUNK)
    return all(bool(torch.isfinite(flat[start : start + FINITE_CHUNK]).all()) for start in chunks)


def _number_tensors(param: torch.nn.Parameter) -> list[torch.Tensor]:
    """The float tensors a weight's values come from: itself, or for a 4-bit weight its quantization state (one NaN
    in a block makes the double-quantization offset NaN, and with it every value of the dequantized matrix)."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return [param] if param.is_floating_point() else []
    nested = getattr(state, "state2", None)
    parts = (state.absmax, getattr(state, "offset", None), None if nested is None else nested.absmax)
    return [part for part in parts if isinstance(part, torch.Tensor) and part.is_floating_point()]


def check_weights_finite(path: str, model) -> None:
    """Every weight of the loaded base is a finite number: a NaN or inf would make every log-prob NaN (train stops
    at its first step, eval would print a table of NaN, a merge would write them)."""
    bad = [name for name, param in model.named_parameters() if not all(map(_all_finite, _number_tensors(param)))]
    if bad:
        raise UserError(
            f"{path}: {len(bad)} weight(s) are not finite (NaN or inf: {some_keys(bad)}); the model's weight files "
            "are damaged"
        )
