"""Fuzzing the loading of model and adapter folders: every config field mangled (wrong type, huge, negative, zero,
missing, nested), tensors missing, extra, of another shape or dtype, NaN/inf, truncated or lying safetensors headers.
Each case ends in one line (a UserError) or loads fine; never another exception, and each in bounded time and memory
(a header claiming 10**12 elements must not be allocated)."""

from __future__ import annotations

import json
import math
import resource
import struct
import time
from pathlib import Path

import pytest
import torch

from dpo_cli.errors import UserError
from tests.model.test_hostile_model_folders import copy_model, edit_weights, write_safetensors_header

MISSING = object()
CONFIG_VALUES = {
    "wrong type": "abc",
    "null": None,
    "float": 2.5,
    "huge": 10**12,
    "beyond int64": 10**30,
    "negative": -1,
    "zero": 0,
    "nested": {"a": [1]},
    "missing": MISSING,
}
CONFIG_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "model_type",
    "rope_parameters",
    "torch_dtype",
]
SECONDS_PER_CASE = 20
PEAK_GROWTH_BYTES = 1_500_000_000  # the model is 1 MB; anything near this would be an allocation from a lying file


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def outcome(load) -> str:
    """'loaded' or 'refused: LINE'; any other exception propagates and fails the test with its traceback."""
    started = time.monotonic()
    try:
        load()
        result = "loaded"
    except UserError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 1200, message
        result = f"refused: {message}"
    assert time.monotonic() - started < SECONDS_PER_CASE
    return result


@pytest.fixture(scope="module")
def peak_guard():
    before = peak_rss_bytes()
    yield
    assert peak_rss_bytes() - before < PEAK_GROWTH_BYTES


def load_plain(folder: Path):
    from dpo_cli.model.load import load_pretrained

    return load_pretrained(str(folder), dtype=torch.float32)


def load_4bit(folder: Path):
    from dpo_cli.config import ModelSection
    from dpo_cli.model.load import load_base_model

    return load_base_model(ModelSection(path=str(folder), quantize=True), torch.device("cpu"))


@pytest.mark.parametrize("field", CONFIG_FIELDS)
def test_config_fields_mangled(stories_model, tmp_path, field, peak_guard):
    folder = copy_model(stories_model, tmp_path / "base")
    original = json.loads((folder / "config.json").read_text())
    results = {}
    for name, value in CONFIG_VALUES.items():
        config = {key: item for key, item in original.items() if not (key == field and value is MISSING)}
        if value is not MISSING:
            config[field] = value
        (folder / "config.json").write_text(json.dumps(config))
        results[name] = outcome(lambda: load_plain(folder))
    # the values the weights cannot have are refused, whatever else loads
    if field in ("vocab_size", "hidden_size", "num_hidden_layers"):
        assert all(results[name].startswith("refused") for name in ("huge", "negative", "zero", "wrong type")), results


def weight_cases() -> dict:
    """{case: change(tensors)} for the weights of stories260K (tied head, 5 layers)."""
    layer = "model.layers.0"

    def drop(key):
        return lambda tensors: tensors.pop(key)

    def set_to(key, value):
        return lambda tensors: tensors.update({key: value(tensors[key])})

    return {
        "missing embedding": drop("model.embed_tokens.weight"),
        "missing norm": drop(f"{layer}.input_layernorm.weight"),
        "missing projection": drop(f"{layer}.self_attn.q_proj.weight"),
        "missing final norm": drop("model.norm.weight"),
        "extra tensor": lambda tensors: tensors.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(4, 4)}),
        "extra unrelated": lambda tensors: tensors.update({"something.else": torch.zeros(3)}),
        "transposed": set_to(f"{layer}.mlp.up_proj.weight", lambda t: t.t().contiguous()),
        "one row more": set_to("model.embed_tokens.weight", lambda t: torch.cat([t, t[:1]])),
        "flattened": set_to(f"{layer}.self_attn.k_proj.weight", lambda t: t.flatten()),
        "scalar": set_to("model.norm.weight", lambda t: t[0].clone()),
        "int32 weight": set_to(f"{layer}.mlp.down_proj.weight", lambda t: t.to(torch.int32)),
        "bool weight": set_to("model.norm.weight", lambda t: t > 0),
        "uint8 weight": set_to(f"{layer}.self_attn.v_proj.weight", lambda t: t.to(torch.uint8)),
        "float16 weight": set_to(f"{layer}.self_attn.o_proj.weight", lambda t: t.half()),
        "bfloat16 weight": set_to("model.embed_tokens.weight", lambda t: t.bfloat16()),
        "nan weight": set_to(f"{layer}.mlp.gate_proj.weight", lambda t: t.fill_(math.nan)),
        "inf weight": set_to("model.norm.weight", lambda t: t.fill_(math.inf)),
        "empty": lambda tensors: tensors.clear(),
    }


@pytest.mark.parametrize("case", list(weight_cases()))
def test_weights_mangled(stories_model, tmp_path, case, peak_guard):
    folder = copy_model(stories_model, tmp_path / "base")
    edit_weights(folder / "model.safetensors", weight_cases()[case])
    result = outcome(lambda: load_plain(folder))
    refused = (
        "missing",
        "extra",
        "transposed",
        "one row",
        "flattened",
        "scalar",
        "int32",
        "bool",
        "uint8",
        "nan",
        "inf",
    )
    if case.startswith(refused):
        assert result.startswith("refused"), result
    if case.startswith("missing"):
        assert "missing from the weight files" in result


@pytest.mark.parametrize("case", ["missing projection", "extra tensor", "transposed", "int32 weight", "nan weight"])
def test_weights_mangled_under_4bit(stories_model, tmp_path, case, peak_guard):
    """The 4-bit path used to fail inside bitsandbytes (AttributeError 'compress_statistics') on missing layers."""
    folder = copy_model(stories_model, tmp_path / "base")
    edit_weights(folder / "model.safetensors", weight_cases()[case])
    result = outcome(lambda: load_4bit(folder))
    assert result.startswith("refused"), result


def header_cases(real: bytes) -> dict:
    """{case: bytes of model.safetensors} built by hand from the real file."""
    (length,) = struct.unpack("<Q", real[:8])
    header = json.loads(real[8 : 8 + length])
    huge = dict(header)
    huge["model.embed_tokens.weight"] = {"dtype": "F32", "shape": [10**12, 64], "data_offsets": [0, 4 * 64 * 10**12]}
    lying = dict(header)
    entry = dict(lying["model.norm.weight"])
    entry["shape"] = [10**6, 10**6]
    lying["model.norm.weight"] = entry
    unknown_dtype = dict(header)
    unknown_dtype["model.norm.weight"] = {**header["model.norm.weight"], "dtype": "Q9"}

    def rebuilt(new_header: dict) -> bytes:
        raw = json.dumps(new_header).encode()
        return struct.pack("<Q", len(raw)) + raw + real[8 + length :]

    return {
        "empty file": b"",
        "text": b"this is not a safetensors file\n",
        "truncated length": real[:5],
        "truncated header": real[: 8 + length // 2],
        "truncated data": real[: len(real) // 2],
        "header length huge": struct.pack("<Q", 2**60) + real[8:],
        "header not json": struct.pack("<Q", 10) + b"not json!!" + real[8 + length :],
        "header a list": rebuilt([1, 2]),  # type: ignore[arg-type]
        "tensor claiming 10**12 elements": rebuilt(huge),
        "shape larger than its data": rebuilt(lying),
        "unknown dtype": rebuilt(unknown_dtype),
    }


HEADER_CASES = [
    "empty file",
    "text",
    "truncated length",
    "truncated header",
    "truncated data",
    "header length huge",
    "header not json",
    "header a list",
    "tensor claiming 10**12 elements",
    "shape larger than its data",
    "unknown dtype",
]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_safetensors_headers_mangled(stories_model, tmp_path, case, peak_guard):
    folder = copy_model(stories_model, tmp_path / "base")
    real = (folder / "model.safetensors").read_bytes()
    cases = header_cases(real)
    assert sorted(cases) == sorted(HEADER_CASES)
    (folder / "model.safetensors").write_bytes(cases[case])
    result = outcome(lambda: load_plain(folder))
    assert result.startswith("refused") and "model.safetensors" in result, result


def test_sharded_index_naming_files_outside_the_folder(stories_model, tmp_path, peak_guard):
    folder = copy_model(stories_model, tmp_path / "base")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../../etc/passwd"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "not a file in" in outcome(lambda: load_plain(folder))
    (folder / "model.safetensors.index.json").write_text("[1, 2")
    assert "not a readable weight index" in outcome(lambda: load_plain(folder))


# --- adapter folders -------------------------------------------------------------------------------------------


def adapter_cases() -> dict:
    def first(tensors, part):
        return sorted(key for key in tensors if part in key)[0]

    def set_first(part, value):
        return lambda tensors: tensors.update({first(tensors, part): value(tensors[first(tensors, part)])})

    return {
        "nan A": set_first("lora_A", lambda t: t.fill_(math.nan)),
        "inf B": set_first("lora_B", lambda t: t.fill_(-math.inf)),
        "missing B": lambda tensors: tensors.pop(first(tensors, "lora_B")),
        "extra module": lambda tensors: tensors.update(
            {"base_model.model.model.layers.0.mlp.nothing.lora_A.weight": torch.zeros(8, 64)}
        ),
        "unrelated key": lambda tensors: tensors.update({"hello": torch.zeros(2)}),
        "wrong rank": set_first("lora_A", lambda t: torch.cat([t, t])),
        "wrong width": set_first("lora_A", lambda t: t[:, :-1].contiguous()),
        "int dtype": set_first("lora_B", lambda t: t.to(torch.int32)),
        "float16": set_first("lora_B", lambda t: t.half()),
        "empty": lambda tensors: tensors.clear(),
    }


def load_adapter_folder(folder: Path):
    from dpo_cli.model.adapter import load_policy, open_adapter

    return load_policy(open_adapter(folder))


@pytest.mark.parametrize("case", list(adapter_cases()))
def test_adapter_weights_mangled(tiny_adapter, tmp_path, case, peak_guard):
    folder = copy_model(tiny_adapter, tmp_path / "adapter")
    edit_weights(folder / "adapter_model.safetensors", adapter_cases()[case])
    result = outcome(lambda: load_adapter_folder(folder))
    if case in ("nan A", "inf B"):
        assert "not finite" in result, result
    elif case != "float16":
        assert result.startswith("refused"), result


@pytest.mark.parametrize("case", ["empty file", "truncated header", "tensor claiming 10**12 elements", "text"])
def test_adapter_headers_mangled(tiny_adapter, tmp_path, case, peak_guard):
    folder = copy_model(tiny_adapter, tmp_path / "adapter")
    real = (folder / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", real[:8])
    header = json.loads(real[8 : 8 + length])
    key = sorted(name for name in header if name != "__metadata__")[0]
    huge = {**header, key: {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    if case == "tensor claiming 10**12 elements":
        write_safetensors_header(folder / "adapter_model.safetensors", huge, real[8 + length :])
    else:
        data = {"empty file": b"", "truncated header": real[: 8 + length // 2], "text": b"hello"}[case]
        (folder / "adapter_model.safetensors").write_bytes(data)
    result = outcome(lambda: load_adapter_folder(folder))
    assert result.startswith("refused") and "adapter_model.safetensors" in result, result


@pytest.mark.parametrize(
    "change",
    [
        {"r": "eight"},
        {"r": 10**12},
        {"r": -1},
        {"lora_alpha": None},
        {"target_modules": 5},
        {"target_modules": ["no_such_module"]},
        {"peft_type": "IA3"},
        {"base_model_name_or_path": 7},
        {"lora_dropout": "high"},
        {"use_dora": "yes"},
        {"fan_in_fan_out": [1]},
    ],
    ids=str,
)
def test_adapter_config_mangled(tiny_adapter, tmp_path, change, peak_guard):
    folder = copy_model(tiny_adapter, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    outcome(lambda: load_adapter_folder(folder))


# --- no false refusals: other architectures, including the ones transformers converts while loading -----------

SMALL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}
ARCHITECTURES = {
    "qwen2": {},
    "gemma2": {},
    "llama-tied": {"tie_word_embeddings": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # experts stored apart, fused while loading
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
}


def saved_architecture(name: str, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(name.removesuffix("-tied"), **SMALL, **ARCHITECTURES[name])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_other_architectures_load_and_their_damage_is_one_line(tmp_path, name, peak_guard):
    folder = saved_architecture(name, tmp_path / name)
    assert outcome(lambda: load_plain(folder)) == "loaded"
    first_layer_weights = sorted(key for key in weight_keys(folder) if ".layers.0." in key)
    key = first_layer_weights[0]  # for the MoE models an expert weight, which transformers fuses while loading
    damages = {
        "drop": lambda tensors: tensors.pop(key),
        "reshape": lambda tensors: tensors.update({key: torch.ones(3)}),
    }
    for damage, change in damages.items():
        saved_architecture(name, folder)
        edit_weights(folder / "model.safetensors", change)
        assert outcome(lambda: load_plain(folder)).startswith("refused"), (name, damage)


def weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        return list(weights.keys())
