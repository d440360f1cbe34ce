"""`model.reference_adapter` (`--reference-adapter`): the reference apart from the adapter the policy starts from.

Policy A (`--from-adapter A`) against reference B (another adapter) or the bare base (`base`): step 1's loss is
log 2 only when the reference is the policy's own start, and otherwise equals the loss computed here with two
separately loaded PEFT models. The cache entry, --resume's fixed settings, reference-adapter/ and eval follow it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from shutil import copytree

import pytest
import torch

from dpo_cli.config import ModelSection, recipe_from_dict
from tests.conftest import run_cli_inprocess
from tests.run.test_from_adapter import (
    LOG_2,
    _args,
    _built_run,
    _completion_logps,
    _first_batch_loss,
    _train_records,
    make_adapter,
)

LOSS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def adapters(stories_model, tmp_path_factory) -> dict[str, Path]:
    """Two adapters of the same shape, clearly different models: A (the start) and B (another reference)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "A": make_adapter(stories_model, root / "A"),
        "B": make_adapter(stories_model, root / "B", scale=0.12),
    }


@pytest.fixture(scope="module")
def few_pairs(stories_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    path.write_text("".join(stories_data["train"].read_text().splitlines(keepends=True)[:12]))
    return path


def _direct_loss(model_path: Path, pairs, policy_dir: Path | None, reference_dir: Path | None, beta: float) -> float:
    """Mean sigmoid DPO loss with plain PEFT models: log p from each model's own forward, no dpo-cli scoring."""
    from peft import PeftModel

    from dpo_cli.model.load import load_base_model

    section, cpu = ModelSection(path=str(model_path)), torch.device("cpu")
    policy = load_base_model(section, cpu)
    policy = policy if policy_dir is None else PeftModel.from_pretrained(policy, str(policy_dir))
    base = load_base_model(section, cpu)
    reference = base if reference_dir is None else PeftModel.from_pretrained(base, str(reference_dir))
    losses = []
    for pair in pairs:
        margin = 0.0
        for side, sign in (("chosen_ids", 1.0), ("rejected_ids", -1.0)):
            completion = pair[side]
            log_ratio = _completion_logps(policy, pair["prompt_ids"], completion) - _completion_logps(
                reference, pair["prompt_ids"], completion
            )
            margin += sign * beta * log_ratio
        losses.append(-torch.nn.functional.logsigmoid(torch.tensor(margin, dtype=torch.float64)).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    ("start", "reference"), [("A", "B"), ("A", "base"), ("", "B")], ids=["A-refers-to-B", "A-to-base", "base-to-B"]
)
def test_step_one_loss_against_another_reference_equals_plain_peft(
    stories_model, few_pairs, adapters, tmp_path, start, reference
):
    """A fresh policy (no --from-adapter: LoRA B is zero, so the policy is the base) against B is covered too."""
    start_dir = adapters[start] if start else None
    reference_dir = adapters["B"] if reference == "B" else None
    run = _built_run(
        stories_model, few_pairs, tmp_path / "run", start_dir or "", reference_adapter=str(reference_dir or "base")
    )
    loss = _first_batch_loss(run, run.scoring)
    pairs = [run.train_pairs[i] for i in range(4)]
    expected = _direct_loss(stories_model, pairs, start_dir, reference_dir, run.recipe.dpo.beta)
    assert loss == pytest.approx(expected, abs=LOSS_TOLERANCE)
    assert abs(loss - LOG_2) > 1e-3, "the reference is not the policy's start, so step 1 is not log 2"


def test_the_same_adapter_named_as_reference_is_still_log_2(stories_model, few_pairs, adapters, tmp_path):
    """Named explicitly (a copy at another path), the reference is the start again: log 2 at step 1."""
    same = copytree(adapters["A"], tmp_path / "same")
    run = _built_run(stories_model, few_pairs, tmp_path / "run", adapters["A"], reference_adapter=str(same))
    assert _first_batch_loss(run, run.scoring) == pytest.approx(LOG_2, abs=1e-6)


def test_the_cache_fingerprint_follows_the_reference(stories_model, adapters, tmp_path):
    from dpo_cli.model.load import add_lora, load_base_model
    from dpo_cli.model.reference_adapter import adapter_content_sha256, start_from_adapter
    from dpo_cli.run.reference import reference_cache

    recipe = recipe_from_dict({"model": {"path": str(stories_model)}, "data": {"cache_dir": str(tmp_path / "c")}})

    def entry(start: Path | None, reference: Path | None):
        model = add_lora(load_base_model(recipe.model, torch.device("cpu")), recipe.lora, False)
        if start is not None:
            start_from_adapter(model, start, recipe.model.path, reference)
        return reference_cache(recipe, model, "pairs-key", 12)

    bare = entry(None, None)
    a_refers_to_a, a_refers_to_b, a_refers_to_base = (
        entry(adapters["A"], adapters["A"]),
        entry(adapters["A"], adapters["B"]),
        entry(adapters["A"], None),
    )
    assert a_refers_to_b.inputs["reference_adapter"] == adapter_content_sha256(adapters["B"])
    assert a_refers_to_a.folder != a_refers_to_b.folder
    # The bare base is the same reference whatever the policy starts from: the same entry as a run from the base.
    assert "reference_adapter" not in a_refers_to_base.inputs and a_refers_to_base.folder == bare.folder


def test_run_folder_resume_and_eval_follow_the_reference(stories_model, few_pairs, adapters, tmp_path, capsys):
    """Reference B: reference-adapter/ holds B, byte for byte; reference base: no copy, recipe.yaml and the card
    say so, eval scores against the bare base; --resume with another reference is one line and changes nothing."""
    runs = {}
    for name, value in (("B", str(adapters["B"])), ("base", "base")):
        out = tmp_path / name
        extra = ("--reference-adapter", value, "--set", "dpo.precompute_ref=false", "--max-steps", 1)
        code, _, stderr = run_cli_inprocess(capsys, *_args(stories_model, few_pairs, out, adapters["A"], *extra))
        assert code == 0, stderr
        runs[name] = out
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (runs["B"] / "reference-adapter" / file).read_bytes() == (adapters["B"] / file).read_bytes()
    assert "model.reference_adapter" in (runs["B"] / "README.md").read_text()
    assert not (runs["base"] / "reference-adapter").exists()
    assert "reference is the bare base" in (runs["base"] / "recipe.yaml").read_text()
    assert "reference policy was the bare base" in (runs["base"] / "README.md").read_text()

    before = (runs["base"] / "metrics.jsonl").read_text()
    again = ("--reference-adapter", str(adapters["B"]), "--set", "dpo.precompute_ref=false", "--max-steps", 2)
    code, _, stderr = run_cli_inprocess(
        capsys, *_args(stories_model, few_pairs, runs["base"], adapters["A"], *again), "--resume"
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "reference was the bare base, now " in stderr and str(adapters["B"]) in stderr, stderr
    assert (runs["base"] / "metrics.jsonl").read_text() == before

    for name, expected in (("base", "the base"), ("B", f"base + {runs['B'] / 'reference-adapter'}")):
        code, _, stderr = run_cli_inprocess(
            capsys, "eval", "--adapter", runs[name], "--data", few_pairs, "--output", tmp_path / f"{name}.json"
        )
        assert code == 0, stderr
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["reference"] == expected
    # Policy A against the bare base: step 1 is not log 2.
    first = _train_records(runs["base"])[0]
    assert not math.isclose(first["loss"], LOG_2, abs_tol=1e-3)
