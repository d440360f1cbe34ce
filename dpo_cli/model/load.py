"""Loading the base model 4-bit with LoRA adapters, and switching between policy and reference.

The reference policy is the same weights with the adapters disabled, or, in a run started from an adapter
(`train --from-adapter`, model/reference_adapter.py), the frozen adapter named REFERENCE_ADAPTER on the same base:
`reference_mode(model)` is the only place that switches to it, so there is never a second copy of the base in memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from dpo_cli.config import LoraSection, ModelSection
from dpo_cli.dpo.scoring import ScoringModel
from dpo_cli.errors import UserError
from dpo_cli.model.base_weights import (
    check_loading_info,
    check_weights_finite,
    check_weights_match_config,
    is_loading_report_error,
    load_config,
    short,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"recipe key model.device: {name!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise UserError(
            f"recipe key model.device: {name!r} but {visible} CUDA GPU(s) are visible; use cuda:0 to cuda:{visible - 1}"
        )
    return device


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


IGNORED_RECIPE_TRUST = (
    "recipe key model.trust_remote_code is ignored: a model's own code runs only with --trust-remote-code on the "
    "command line"
)


def _check_model_path(path: str, marker: str = "config.json") -> None:
    """Fail early, in one line, on a local path that is not what we need (hub ids pass through)."""
    if not path:
        raise UserError("no base model: pass --model PATH_OR_ID or set model.path in the recipe")
    local = Path(path)
    for parent in local.parents:
        if parent.is_file():
            raise UserError(f"{path}: not a model folder ({parent} is a file); pass a Hugging Face model folder or id")
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (local / marker).is_file():
        raise UserError(f"{path}: not a model folder (no {marker}); pass a Hugging Face model folder or id")


def _quiet_transformers() -> None:
    # Our own progress bars and one-line errors are the interface; transformers' per-load bars and notes are noise.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()

    _check_model_path(path, marker="tokenizer_config.json")
    try:
        if (Path(path) / "config.json").is_file():  # AutoTokenizer reads it too, and a bad field would be a traceback
            load_config(path, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UserError(f"{path}: cannot load the tokenizer ({_first_line(error)})") from None
    except ValueError as error:
        raise _remote_code_refused(path, error) from None
    if tokenizer.eos_token is None:
        raise UserError(f"{path}: the tokenizer has no EOS token, which DPO appends to every completion")
    if tokenizer.pad_token is None:  # padding is masked out; any id will do, and EOS is what TRL uses
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _remote_code_refused(path: str, error: ValueError) -> Exception:
    """Transformers' refusal to run a model's own code, as one line; any other ValueError stays a bug."""
    if "trust_remote_code" not in str(error):
        return error
    return UserError(
        f"{path}: this model needs its own Python code (auto_map in its config) to load; read that code and pass "
        "--trust-remote-code if you trust it, or use a model that Transformers supports natively"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else error.__class__.__name__


def load_base_model(
    config: ModelSection,
    device: torch.device,
    trust_remote_code: bool = False,
    shardable: bool = False,
    skeleton: bool = False,
    load_device: torch.device | None = None,
):
    """The frozen base: NF4 4-bit with double quantization, or plain weights in the compute dtype.

    `trust_remote_code` comes from the command line; `config.trust_remote_code` (a recipe key) is never read.
    `shardable` stores the 4-bit weights in the compute dtype instead of uint8 (the same values), so that FSDP can
    shard them (run/sharding.py). `skeleton` builds the same modules on the meta device without reading a weight
    (the processes other than the first under `--sharding fsdp`, which run/sharding.py fills with their slices).
    `load_device` is where the weights are put (and quantized), `device` by default; the compute dtype still follows
    `device`, the one the model will run on (under fsdp rank 0 loads onto the CPU and sends each process its slice).
    """
    from transformers import BitsAndBytesConfig

    _quiet_transformers()
    _check_model_path(config.path)
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if config.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if shardable else torch.uint8,
        )
        kwargs["device_map"] = {"": load_device or device}
    if skeleton:  # the compute dtype above still follows the real device
        kwargs.update(device_map={"": "meta"}, use_kernels=False)  # the kernels library refuses the meta device
    model = load_pretrained(config.path, **kwargs)
    if not config.quantize and not skeleton:
        model.to(load_device or device)
    _disable_bnb_cpu_repacking(model)
    _disable_dropout(model)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_pretrained(path: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` for a base only if its weight files fill the model its
    config describes (checked before anything is allocated, and again on what transformers reports) and every
    weight loaded is finite; otherwise one line. Every command that loads a base goes through here."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        check_weights_match_config(path, kwargs.get("trust_remote_code", False))
        model, loading_info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as error:
        raise UserError(f"{path}: cannot load the model ({_first_line(error)})") from None
    except ValueError as error:
        raise _remote_code_refused(path, error) from None
    except StrictDataclassError as error:
        raise UserError(f"{path}/config.json: not a model config transformers can read ({short(error)})") from None
    except RuntimeError as error:
        if not is_loading_report_error(error):
            raise
        # Transformers' report of which weights is logged (and turned down here), not in the error: say what it means.
        raise UserError(
            f"{path}: the weight files do not fit the model config.json describes (transformers could not load or "
            "convert some of them into it: other shapes or missing parts); the config does not describe these weights"
        ) from None
    check_loading_info(path, loading_info)
    if kwargs.get("device_map") != {"": "meta"}:  # a skeleton has no values to check
        check_weights_finite(path, model)
    return model


def _disable_bnb_cpu_repacking(model) -> None:
    # bitsandbytes repacks 4-bit weights in place for a faster CPU inference kernel the first time a Linear4bit runs
    # in eval mode without grad. The repack asserts out_features % 32 == 0 (stories260K's MLP has 172) and gives
    # slightly different numbers from the training path, so eval would not equal training. Keep one code path.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _disable_dropout(model) -> None:
    # The reference pass and the policy pass must see the same function of the weights; dropout would make the
    # implicit reward noisy. TRL disables it too (disable_dropout=True).
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def lora_config(config: LoraSection):
    from peft import LoraConfig

    targets = config.target_modules
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


def add_lora(model, config: LoraSection, gradient_checkpointing: bool):
    from peft import get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return get_peft_model(model, lora_config(config))
    except ValueError as error:
        raise UserError(f"recipe key lora.target_modules: {_first_line(error)}") from None


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer of the backbone in place (`model.compile`); the number compiled.

    Layers, not the whole model: the scoring code calls the backbone and the LM head separately (the fused log-probs
    never build the logits), and each layer is the same graph, so one compile serves them all. Shapes change with
    every micro-batch, so the layers are compiled for dynamic shapes rather than recompiled per width."""
    backbone, _ = backbone_and_head(model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(
            f"--compile: {type(backbone).__name__} keeps no decoder layers in `.layers`; run without --compile"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def load_adapter(model, adapter_dir: Path, trainable: bool):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except ValueError as error:  # PEFT's refusals (no module matches target_modules, ...) are ValueErrors
        raise UserError(
            f"{adapter_dir}/adapter_config.json: PEFT cannot put this adapter on the base ({short(error)}); pass "
            "--model with the base it was trained on"
        ) from None


def backbone_and_head(model):
    """(the transformer without its head, the LM head) of a plain or PEFT-wrapped causal LM."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model, causal_lm.get_output_embeddings()


def logit_transform(model) -> tuple[float, float | None]:
    """(logit scale, soft-cap) that the model's own forward applies to its logits, so fused log-probs match it."""
    text_config = model.config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    if getattr(text_config, "logits_scaling", None):  # Granite divides by it
        scale = 1.0 / text_config.logits_scaling
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), softcap


def attention_backend(backbone) -> str:
    """The attention implementation transformers runs `backbone` with (sdpa, eager, flex_attention, ...)."""
    return getattr(backbone.config, "_attn_implementation", None) or "eager"


def scoring_model(model) -> ScoringModel:
    """What dpo/scoring needs of a plain or PEFT-wrapped causal LM, as plain values and callables."""
    backbone, lm_head = backbone_and_head(model)
    scale, softcap = logit_transform(model)
    return ScoringModel(
        backbone=backbone,
        lm_head=lm_head,
        logit_scale=scale,
        softcap=softcap,
        attention_backend=attention_backend(backbone),
        mask_dtype=backbone.get_input_embeddings().weight.dtype,
        reference_mode=lambda: reference_mode(model),
    )


REFERENCE_ADAPTER = "reference"
"""The PEFT name of a frozen reference adapter (model/reference_adapter.py): a model that has one is scored as the
reference with it active, never with the adapters disabled (which would be the bare base)."""


@contextlib.contextmanager
def reference_mode(model) -> Iterator[None]:
    """The reference policy, with no autograd graph: base + the frozen reference adapter when the model has one,
    else the same model with every adapter disabled."""
    with torch.no_grad():
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            with _active_adapter(model, REFERENCE_ADAPTER):
                yield
        else:
            with model.disable_adapter():
                yield


@contextlib.contextmanager
def _active_adapter(model, name: str) -> Iterator[None]:
    """`name` as the PEFT model's active adapter, then the one before; every parameter's requires_grad as it was.

    PEFT's set_adapter also marks the adapter it activates trainable and every other one frozen; with
    inference_mode it freezes them all, and the policy's flags are put back after, so nothing trainable changes."""
    before = model.active_adapter
    trainable = [param for param in model.parameters() if param.requires_grad]
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(before, inference_mode=True)
        for param in trainable:
            param.requires_grad_(True)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def read_adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter folder was trained on, as PEFT recorded it."""
    return read_adapter_config(adapter_dir).get("base_model_name_or_path") or ""


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json as a mapping, or one line saying why it is not one PEFT could read."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{adapter_dir}: not an adapter folder (no adapter_config.json); pass a dpo-cli train output")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        why = _first_line(error)
        raise UserError(f"{config_path}: not valid JSON ({why}); the adapter folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: not a JSON object; the adapter folder is damaged")
    return config
