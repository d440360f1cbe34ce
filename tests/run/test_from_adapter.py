"""`train --from-adapter DIR`: the policy starts as DIR's adapter and the reference is base + DIR's adapter, frozen.

The adapter here is a PEFT LoRA adapter with random non-zero B on 4-bit stories260K, so base + adapter is a model
clearly other than the base: a reference that were the bare base would give step 1 another loss than log 2.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dpo_cli.config import LoraSection, ModelSection, recipe_from_dict
from tests.conftest import run_cli_inprocess

LOG_2 = math.log(2.0)


def make_adapter(model_path: Path, folder: Path, lora: LoraSection | None = None, scale: float = 0.05) -> Path:
    """A PEFT LoRA adapter of `model_path` with random non-zero B (a trained adapter, as far as DPO can tell)."""
    from peft import get_peft_model

    from dpo_cli.model.load import load_base_model, lora_config

    base = load_base_model(ModelSection(path=str(model_path)), torch.device("cpu"))
    torch.manual_seed(0)  # lora_A's initialisation: the same adapter in every session
    model = get_peft_model(base, lora_config(lora or LoraSection()))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_adapter(stories_model, tmp_path_factory) -> Path:
    return make_adapter(stories_model, tmp_path_factory.mktemp("sft") / "adapter")


@pytest.fixture(scope="module")
def few_pairs(stories_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    path.write_text("".join(stories_data["train"].read_text().splitlines(keepends=True)[:12]))
    return path


def _args(model, data, out, adapter, *extra):
    return (
        "train",
        "--model", model,
        "--data", data,
        "--output-dir", out,
        "--from-adapter", adapter,
        "--max-steps", 2,
        "--batch-size", 4,
        "--max-length", 96,
        "--set", "training.save_steps=1",
        *extra,
    )  # fmt: skip


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize(
    ("reference", "loading"),
    [("true", ("--gradient-checkpointing",)), ("false", ("--no-quantize", "--no-gradient-checkpointing"))],
    ids=["precomputed-4bit-checkpointing", "live-fp32"],
)
def test_step_one_is_log_2_since_the_policy_starts_as_the_reference(
    stories_model, few_pairs, sft_adapter, tmp_path, capsys, reference, loading
):
    out = tmp_path / "run"
    extra = ("--set", f"dpo.precompute_ref={reference}", "--set", f"data.cache_dir={tmp_path / 'cache'}", *loading)
    code, stdout, stderr = run_cli_inprocess(capsys, *_args(stories_model, few_pairs, out, sft_adapter, *extra))
    assert code == 0, stderr
    assert ("reference log-probs: computed" in stdout) == (reference == "true")
    if reference == "true":  # cached under the adapter's content
        from dpo_cli.model.reference_adapter import adapter_content_sha256

        (meta,) = (tmp_path / "cache" / "reference").glob("*/meta.json")
        assert json.loads(meta.read_text())["inputs"]["reference_adapter"] == adapter_content_sha256(sft_adapter)
    first = _train_records(out)[0]
    assert first["loss"] == pytest.approx(LOG_2, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert _train_records(out)[1]["loss"] != pytest.approx(LOG_2, abs=1e-6), "the policy trained away from it"
    # The outputs hold the policy only; the reference's copy is its own folder, byte for byte DIR's.
    for folder in (out, out / "checkpoints" / "step-000001"):
        assert not (folder / "reference").exists()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "reference-adapter" / name).read_bytes() == (sft_adapter / name).read_bytes()
    if reference == "false":
        _resume_takes_the_same_content_only(stories_model, few_pairs, out, sft_adapter, extra, tmp_path, capsys)


def _resume_takes_the_same_content_only(model, data, out, adapter, extra, tmp_path, capsys):
    """--resume refuses another adapter at the same path, and takes the same adapter at another path."""
    from shutil import copytree

    from safetensors.torch import load_file, save_file

    changed = copytree(adapter, tmp_path / "changed")
    tensors = load_file(str(changed / "adapter_model.safetensors"))
    save_file({key: value * 1.5 for key, value in tensors.items()}, str(changed / "adapter_model.safetensors"))
    before = (out / "metrics.jsonl").read_text()
    resume = ("--resume", "--max-steps", 3)
    code, _, stderr = run_cli_inprocess(capsys, *_args(model, data, out, changed, *extra), *resume)
    assert code == 2 and "cannot resume with changed settings (model.from_adapter was" in stderr, stderr
    assert (out / "metrics.jsonl").read_text() == before
    moved = copytree(adapter, tmp_path / "moved")
    code, _, stderr = run_cli_inprocess(capsys, *_args(model, data, out, moved, *extra), *resume)
    assert code == 0, stderr
    assert [r["step"] for r in _train_records(out)] == [1, 2, 3]


def _built_run(model: Path, data: Path, out: Path, adapter: Path, **model_keys):
    from dpo_cli.run.setup import build_run

    recipe = recipe_from_dict(
        {
            "model": {"path": str(model), "from_adapter": str(adapter), **model_keys},
            "data": {"train": [str(data)], "max_length": 96},
            "training": {"output_dir": str(out), "max_steps": 1, "batch_size": 4},
            "dpo": {"precompute_ref": "false"},
        }
    )
    return build_run(recipe)


def _first_batch_loss(run, scoring) -> float:
    from dpo_cli.dpo.layouts import collate
    from dpo_cli.dpo.scoring import score_batch

    pairs = [run.train_pairs[i] for i in range(4)]
    batch = collate(run.layout, pairs, run.tokenizer.pad_token_id)
    with torch.no_grad():
        return score_batch(scoring, batch, run.recipe.dpo).loss.item()


def test_a_reference_with_the_adapters_disabled_would_give_another_step_one_loss(
    stories_model, few_pairs, sft_adapter, tmp_path
):
    """What the log-2 test rules out: scoring the reference as the bare base (adapters disabled) moves step 1."""
    import contextlib

    run = _built_run(stories_model, few_pairs, tmp_path / "run", sft_adapter)
    assert _first_batch_loss(run, run.scoring) == pytest.approx(LOG_2, abs=1e-6)

    @contextlib.contextmanager
    def bare_base():
        with torch.no_grad(), run.model.disable_adapter():
            yield

    bare = _first_batch_loss(run, replace(run.scoring, reference_mode=bare_base))
    assert abs(bare - LOG_2) > 1e-3, bare


def test_only_the_policy_adapter_trains(stories_model, few_pairs, sft_adapter, tmp_path):
    from dpo_cli.model.load import REFERENCE_ADAPTER

    run = _built_run(stories_model, few_pairs, tmp_path / "run", sft_adapter)
    trainable = {name for name, param in run.model.named_parameters() if param.requires_grad}
    reference = {name for name, _ in run.model.named_parameters() if f".{REFERENCE_ADAPTER}." in name}
    assert reference and not trainable & reference
    assert trainable and all(".default." in name for name in trainable)
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in run.model.parameters() if p.requires_grad}
    # A reference pass switches adapters and back: the same adapter active and the same parameters trainable after.
    _first_batch_loss(run, run.scoring)
    assert run.model.active_adapter == "default"
    assert {name for name, param in run.model.named_parameters() if param.requires_grad} == trainable
    # The policy starts as DIR's weights.
    from safetensors.torch import load_file

    start = load_file(str(sft_adapter / "adapter_model.safetensors"))
    state = dict(run.model.named_parameters())
    for key, value in start.items():
        name = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)
        torch.testing.assert_close(state[name].detach().cpu(), value)


def test_the_reference_cache_fingerprint_is_the_adapters_content(stories_model, sft_adapter, tmp_path):
    """Another adapter of the same shape is another cache entry; the same content (a copy elsewhere) the same one;
    the bare base's entry keeps its name."""
    from shutil import copytree

    from dpo_cli.model.load import add_lora, load_base_model
    from dpo_cli.model.reference_adapter import adapter_content_sha256, start_from_adapter
    from dpo_cli.run.reference import reference_cache

    recipe = recipe_from_dict({"model": {"path": str(stories_model)}, "data": {"cache_dir": str(tmp_path / "c")}})
    other = make_adapter(stories_model, tmp_path / "other", scale=0.08)
    moved = copytree(sft_adapter, tmp_path / "elsewhere" / "copy")

    def entry(adapter: Path | None):
        model = add_lora(load_base_model(recipe.model, torch.device("cpu")), recipe.lora, False)
        if adapter is not None:
            start_from_adapter(model, adapter, recipe.model.path, adapter)
        return reference_cache(recipe, model, "pairs-key", 12)

    bare, first, second, copy = entry(None), entry(sft_adapter), entry(other), entry(moved)
    assert "reference_adapter" not in bare.inputs
    assert first.inputs["reference_adapter"] == adapter_content_sha256(sft_adapter)
    assert len({bare.folder, first.folder, second.folder}) == 3
    assert copy.folder == first.folder


@pytest.fixture
def adapter_variant(sft_adapter, tmp_path):
    """A copy of the adapter folder with its config (or weights) changed by the test."""

    def variant(config_changes: dict | None = None, weights=None) -> Path:
        from safetensors.torch import load_file, save_file

        folder = tmp_path / "variant"
        folder.mkdir()
        config = json.loads((sft_adapter / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        tensors = load_file(str(sft_adapter / "adapter_model.safetensors"))
        save_file(weights(tensors) if weights else tensors, str(folder / "adapter_model.safetensors"))
        return folder

    return variant


def _only_q_proj(tensors):
    return {key: value for key, value in tensors.items() if "q_proj" in key}


def _poisoned(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    return tensors


@pytest.mark.parametrize(
    ("config_changes", "weights", "extra", "message"),
    [
        (None, None, ("--set", "lora.r=8"), "r=16, alpha=32, the recipe's lora section r=8"),
        ({"use_dora": True}, None, (), "a DoRA adapter"),
        ({"modules_to_save": ["lm_head"]}, None, (), "modules_to_save"),
        ({"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}, None, (), "adapter is for another base (Qwen/Qwen2.5-0.5B)"),
        (None, _poisoned, (), "not finite"),
        ({"target_modules": ["q_proj"]}, _only_q_proj, (), "lora.target_modules"),
        (None, None, ("--set", "lora.target_modules=[q_proj]"), "does not fit the recipe's lora section (unexpected"),
    ],
    ids=["rank", "dora", "modules-to-save", "base-name", "non-finite", "fewer-modules", "more-modules"],
)
def test_an_adapter_that_cannot_start_the_run_is_one_line_and_nothing_is_written(
    stories_model, few_pairs, adapter_variant, tmp_path, capsys, config_changes, weights, extra, message
):
    adapter = adapter_variant(config_changes, weights)
    out = tmp_path / "out"
    code, _, stderr = run_cli_inprocess(capsys, *_args(stories_model, few_pairs, out, adapter, *extra))
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_an_adapter_of_another_shape_is_refused_by_its_tensors(stories_model, few_pairs, sft_adapter, tmp_path, capsys):
    """A base of the same name but another MLP width: the tensor shapes decide, once the base has loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(stories_model)
    config.intermediate_size = 128
    other = tmp_path / "other" / stories_model.name
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(stories_model).save_pretrained(other)
    out = tmp_path / "out"
    code, _, stderr = run_cli_inprocess(capsys, *_args(other, few_pairs, out, sft_adapter))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "adapter is for another base: model.layers.0.mlp." in stderr and "172->64 in the adapter" in stderr, stderr
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_keep_the_reference_adapter_out_of_ddp(stories_model, few_pairs, sft_adapter, tmp_path):
    """torchrun (CPU, gloo), live reference: the reference pass switches adapters inside the DDP-wrapped run and
    back, the frozen reference is no DDP parameter, and both ranks take the same (all-reduced) steps."""
    from tests.run.test_distributed import PROCESSES, _finish, _log, _torchrun, _train_records

    out, log = tmp_path / "ddp", tmp_path / "ddp.log"
    args = _args(stories_model, few_pairs, out, sft_adapter, "--batch-size", 2, "--set", "dpo.precompute_ref=false")
    code, output = _finish(_torchrun(tmp_path, [{"args": [str(a) for a in args[1:]], "log": str(log)}]), 300)
    assert code == 0, output[-3000:]
    records = _train_records(out)
    assert records[0]["loss"] == pytest.approx(LOG_2, abs=1e-6) and records[1]["loss"] != records[0]["loss"]
    ranks = [[entry["adapter"] for entry in _log(log, rank)] for rank in range(PROCESSES)]
    assert ranks[0] == ranks[1] and len(set(ranks[0])) == 3, "same adapter on both ranks, changed at each step"


REWARD_TOLERANCE = 5e-5
"""Rewards are beta x differences of float32 log-prob sums of about -140 nats (ulp 1.5e-5): dpo-cli's fused, chunked,
batched log-probs and a plain per-sequence log_softmax agree to a few ulps, up to 1.2e-5 in the rewards here."""


def _completion_logps(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) from the model's own forward and a plain log-softmax (no dpo-cli scoring)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    token_logps = logps.gather(-1, targets[:, None])[:, 0]
    return float(token_logps[len(prompt) - 1 :].sum())


def test_eval_of_a_moved_run_scores_against_its_reference_adapter(
    stories_model, stories_data, sft_adapter, tmp_path, capsys
):
    """A DPO run from an SFT-like adapter, moved elsewhere, its starting adapter deleted: eval's rewards are
    beta * (log p_policy - log p_ref) with ref = base + that adapter, computed here with plain PEFT to 1e-5."""
    from shutil import copytree, move, rmtree

    from peft import PeftModel

    from dpo_cli.data.records import read_jsonl
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.model.load import load_base_model, load_tokenizer

    start = copytree(sft_adapter, tmp_path / "sft")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(stories_data["train"].read_text().splitlines(keepends=True)[:8]))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(stories_data["test"].read_text().splitlines(keepends=True)[:6]))
    run = tmp_path / "run"
    extra = ("--lr", "3e-4", "--max-steps", 2, "--batch-size", 8, "--beta", 0.2, "--set", "training.save_steps=0")
    code, _, stderr = run_cli_inprocess(capsys, *_args(stories_model, data, run, start, *extra))
    assert code == 0, stderr
    recipe_text = (run / "recipe.yaml").read_text()
    assert "reference-adapter/" in recipe_text and f"from_adapter: {start}" in recipe_text
    assert "reference-adapter/" in (run / "README.md").read_text()
    moved = Path(move(run, tmp_path / "elsewhere" / "run"))
    rmtree(start)

    per_pair = tmp_path / "per-pair.jsonl"
    code, _, stderr = run_cli_inprocess(
        capsys, "eval", "--adapter", moved, "--data", test, "--per-example", per_pair, "--output", tmp_path / "m.json"
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "m.json").read_text())["reference"] == f"base + {moved / 'reference-adapter'}"
    rows = [json.loads(line) for line in per_pair.read_text().splitlines()]

    tokenizer = load_tokenizer(str(stories_model))
    pairs, _ = tokenize_pairs(tokenizer, list(read_jsonl(test)), 96)
    section = ModelSection(path=str(stories_model))
    cpu = torch.device("cpu")
    reference = PeftModel.from_pretrained(load_base_model(section, cpu), str(moved / "reference-adapter"))
    policy = PeftModel.from_pretrained(load_base_model(section, cpu), str(moved))
    bare = load_base_model(section, cpu)
    assert len(rows) == len(pairs) == 6
    for row, pair in zip(rows, pairs, strict=True):
        for side in ("chosen", "rejected"):
            completion = pair[f"{side}_ids"]
            expected = 0.2 * (
                _completion_logps(policy, pair.prompt_ids, completion)
                - _completion_logps(reference, pair.prompt_ids, completion)
            )
            assert row[f"reward_{side}"] == pytest.approx(expected, abs=REWARD_TOLERANCE)
            bare_base = 0.2 * (
                _completion_logps(policy, pair.prompt_ids, completion)
                - _completion_logps(bare, pair.prompt_ids, completion)
            )
            assert abs(row[f"reward_{side}"] - bare_base) > 1e-2, "against the bare base the rewards would differ"
    assert any(abs(row["reward_chosen"]) > 1e-2 for row in rows), "the policy moved away from its reference"

    # merge-adapter folds the policy (the run's adapter) into the base, not the reference.
    from transformers import AutoModelForCausalLM

    from dpo_cli.model.merge import logits_on

    merged = tmp_path / "merged"
    args = ("merge-adapter", "--adapter", moved, "--output", merged, "--dtype", "float32")
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 0, stderr
    ids = torch.tensor([pairs[0].prompt_ids + pairs[0].chosen_ids])
    plain = logits_on(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    torch.testing.assert_close(plain, logits_on(policy, ids), atol=1e-4, rtol=0)


def test_the_output_folder_may_not_be_or_hold_the_adapter(stories_model, few_pairs, sft_adapter, tmp_path, capsys):
    from shutil import copytree

    adapter = copytree(sft_adapter, tmp_path / "runs" / "sft")
    for out in (adapter, tmp_path / "runs", adapter / "inside"):
        code, _, stderr = run_cli_inprocess(capsys, *_args(stories_model, few_pairs, out, adapter))
        assert code == 2 and "is or holds --from-adapter" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in sft_adapter.iterdir())


def test_eval_of_a_run_without_its_reference_copy_is_one_line(stories_model, few_pairs, sft_adapter, tmp_path, capsys):
    """Never silently the bare base: a run folder that says it started from an adapter needs its copy."""
    from shutil import copytree

    run = copytree(sft_adapter, tmp_path / "run")
    recipe = recipe_from_dict({"model": {"path": str(stories_model), "from_adapter": "/gone/sft"}})
    recipe.save(run / "recipe.yaml")
    code, _, stderr = run_cli_inprocess(capsys, "eval", "--adapter", run, "--data", few_pairs)
    assert code == 2 and "no reference-adapter/ folder" in stderr and len(stderr.strip().splitlines()) == 1, stderr
