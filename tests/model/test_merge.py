"""`dpo-cli merge-adapter`: the merged model computes the trained policy, merging is deterministic, the folder loads
with plain transformers, and bad input ends in one line with nothing half-written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli_inprocess, run_cli_subprocess

# Max |logit| difference of the merged model against the 4-bit base + adapter, on stories260K text (logits up to
# about 22), per --dtype. Measured: 5.5e-5 to 6.3e-5, 0.08 to 0.11, 0.6 to 0.86; README.md gives the same bounds.
TOLERANCE = {"float32": 2e-4, "float16": 0.25, "bfloat16": 2.0}


def merge(capsys, adapter: Path, output: Path, *flags) -> str:
    code, stdout, stderr = run_cli_inprocess(capsys, "merge-adapter", "--adapter", adapter, "--output", output, *flags)
    assert code == 0, stderr
    return stdout


def self_check(stdout: str) -> float:
    match = re.search(r"self-check: max \|logit difference\|.*?=\s*([-+.e\d]+)", stdout, re.DOTALL)
    assert match, stdout
    return float(match.group(1))


def text_batch(tokenizer, data: Path, count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the first `count` prompt+chosen texts of a preference file."""
    records = [json.loads(line) for line in data.read_text().splitlines()[:count]]
    batch = tokenizer([r["prompt"] + r["chosen"] for r in records], return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"].bool()


def policy_logits(adapter: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from dpo_cli.model.adapter import load_policy, open_adapter
    from dpo_cli.model.merge import logits_on

    return logits_on(load_policy(open_adapter(adapter)), input_ids)


def merged_logits(folder: Path, dtype: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from dpo_cli.model.merge import logits_on

    return logits_on(AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)), input_ids)


def tree(folder: Path) -> dict[str, bytes]:
    """Each file's bytes; the lock file a merge takes on its output folder (empty once released) is not content."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != ".dpo-cli.lock"}


@pytest.mark.slow
def test_merged_logits_match_base_plus_adapter_per_dtype(stories_adapter, stories_data, tmp_path, capsys):
    from dpo_cli.model.adapter import load_base_tokenizer, open_adapter

    input_ids, mask = text_batch(load_base_tokenizer(open_adapter(stories_adapter)), stories_data["test"])
    reference = policy_logits(stories_adapter, input_ids)
    for dtype, tolerance in TOLERANCE.items():
        out = tmp_path / dtype
        stdout = merge(capsys, stories_adapter, out, "--dtype", dtype)
        assert 0 < self_check(stdout) <= tolerance, stdout
        diff = float((merged_logits(out, dtype, input_ids) - reference)[mask].abs().max())
        assert diff <= tolerance, (dtype, diff)
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == dtype
        for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (out / name).is_file(), name


@pytest.mark.slow
def test_merged_folder_loads_in_a_fresh_process_with_plain_transformers(
    stories_adapter, stories_data, tmp_path, capsys
):
    from dpo_cli.model.adapter import load_base_tokenizer, open_adapter

    out = tmp_path / "merged"
    merge(capsys, stories_adapter, out, "--dtype", "float32")
    input_ids, mask = text_batch(load_base_tokenizer(open_adapter(stories_adapter)), stories_data["test"])
    torch.save(input_ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
AutoTokenizer.from_pretrained({str(out)!r})
assert "peft" not in sys.modules and "bitsandbytes" not in sys.modules, "needed peft or bitsandbytes"
with torch.no_grad():
    torch.save(model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    diff = (torch.load(tmp_path / "logits.pt") - policy_logits(stories_adapter, input_ids))[mask].abs().max()
    assert float(diff) <= TOLERANCE["float32"]


@pytest.mark.slow
def test_base_weights_nf4_is_the_dequantized_base_and_original_the_checkpoint(stories_adapter, tmp_path, capsys):
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from dpo_cli.model.adapter import open_adapter

    recipe = open_adapter(stories_adapter).recipe
    checkpoint = load_file(str(Path(recipe.model.path) / "model.safetensors"))
    lora = load_file(str(stories_adapter / "adapter_model.safetensors"))
    name = "model.layers.2.self_attn.q_proj"
    a, b = (lora[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    delta = (recipe.lora.alpha / recipe.lora.r) * b @ a  # (out, in)

    merged = {}
    for base_weights in ("nf4", "original"):
        merge(capsys, stories_adapter, tmp_path / base_weights, "--dtype", "float32", "--base-weights", base_weights)
        merged[base_weights] = load_file(str(tmp_path / base_weights / "model.safetensors"))
    original = checkpoint[f"{name}.weight"]
    torch.testing.assert_close(merged["original"][f"{name}.weight"], original + delta, rtol=0, atol=1e-6)
    # The NF4 base is the checkpoint quantized as `load_in_4bit` does it (blocks of 64, double quantization).
    packed, state = bnbf.quantize_4bit(original, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4 = bnbf.dequantize_4bit(packed, state)
    torch.testing.assert_close(merged["nf4"][f"{name}.weight"], nf4 + delta, rtol=0, atol=1e-6)
    assert (nf4 - original).abs().max() > 1e-3  # so the two really differ
    # What neither adapter nor quantization touches is the checkpoint's, bit for bit, in both.
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged["nf4"][key], checkpoint[key]) and torch.equal(
            merged["original"][key], checkpoint[key]
        )


def test_merging_twice_gives_identical_files(tiny_adapter, tmp_path, capsys):
    merge(capsys, tiny_adapter, tmp_path / "first")
    merge(capsys, tiny_adapter, tmp_path / "second")
    first = tree(tmp_path / "first")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    assert tree(tmp_path / "second") == first


def test_sharded_merge_loads_and_equals_the_single_file(tiny_adapter, tiny_demo, tmp_path, capsys):
    merge(capsys, tiny_adapter, tmp_path / "single", "--dtype", "float32")
    merge(capsys, tiny_adapter, tmp_path / "sharded", "--dtype", "float32", "--max-shard-size", "100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    input_ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    single = merged_logits(tmp_path / "single", "float32", input_ids)
    assert torch.equal(merged_logits(tmp_path / "sharded", "float32", input_ids), single)


def test_merge_bad_inputs_end_in_one_line_and_write_nothing(tiny_adapter, narrower_tiny_model, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = tmp_path / "out"
    cases = [
        (("--adapter", tiny_adapter, "--output", busy), "holds files dpo-cli did not write (keep.txt)"),
        (("--adapter", tiny_adapter, "--output", busy, "--force"), "holds files dpo-cli did not write (keep.txt)"),
        (("--adapter", tiny_adapter, "--output", out, "--dtype", "fp8"), "--dtype fp8: not one of"),
        (("--adapter", tiny_adapter, "--output", out, "--base-weights", "fp4"), "--base-weights fp4: not one of"),
        (("--adapter", tmp_path / "missing", "--output", out), "adapter folder not found"),
        (("--adapter", tiny_adapter, "--output", out, "--model", narrower_tiny_model), "adapter is for another base"),
        (("--adapter", tiny_adapter, "--output", tiny_adapter, "--force"), "would replace the adapter folder"),
        (("--adapter", tiny_adapter, "--output", a_file), "exists and is not a folder"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        code, stdout, stderr = run_cli_inprocess(capsys, "merge-adapter", *args)
        assert code == 2, (args, stdout, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder left behind
    assert (busy / "keep.txt").read_text() == "mine" and (tiny_adapter / "adapter_config.json").is_file()

    # --force replaces an earlier merge-adapter output only; without it even that is kept.
    earlier = tmp_path / "earlier"
    merge(capsys, tiny_adapter, earlier)
    code, _, stderr = run_cli_inprocess(capsys, "merge-adapter", "--adapter", tiny_adapter, "--output", earlier)
    assert code == 2 and "folder is not empty; pass --force to replace it" in stderr
    (earlier / "config.json").write_text("{}")
    merge(capsys, tiny_adapter, earlier, "--force")
    assert (earlier / "config.json").read_text() != "{}"


def test_interrupted_merge_leaves_nothing_half_written(tiny_adapter, tmp_path, capsys, monkeypatch):
    import dpo_cli.model.merge

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    previous = tmp_path / "merged"
    merge(capsys, tiny_adapter, previous, "--dtype", "float32")
    files = tree(previous)
    monkeypatch.setattr(
        dpo_cli.model.merge, "merged_logit_diff", interrupt
    )  # after the files are written, before rename
    for output, flags in ((tmp_path / "new", ()), (previous, ("--force", "--dtype", "bfloat16"))):
        code, _, stderr = run_cli_inprocess(
            capsys, "merge-adapter", "--adapter", tiny_adapter, "--output", output, *flags
        )
        assert code == 130 and "interrupted" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no "new", no temporary folders
    assert tree(previous) == files  # the earlier merge is untouched


@pytest.mark.slow
def test_merge_bad_input_as_a_user_sees_it(tiny_adapter, tmp_path):
    result = run_cli_subprocess(
        "merge-adapter", "--adapter", tiny_adapter, "--output", tmp_path / "o", "--dtype", "int4"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --dtype int4: not one of bfloat16, float16, float32"]


def test_merge_refuses_lora_variants_it_would_fold_wrongly(tmp_path):
    from types import SimpleNamespace

    from peft import LoraConfig

    from dpo_cli.errors import UserError
    from dpo_cli.model.merge import check_plain_lora

    check_plain_lora(SimpleNamespace(peft_config={"default": LoraConfig()}), tmp_path)  # what `dpo-cli train` writes
    for variant in ({"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"lora_bias": True}):
        policy = SimpleNamespace(peft_config={"default": LoraConfig(**variant)})
        with pytest.raises(UserError, match=f"sets {next(iter(variant))}; merge-adapter folds plain LoRA only"):
            check_plain_lora(policy, tmp_path)
