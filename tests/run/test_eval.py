"""`dpo-cli eval`: equal to TRL's DPOTrainer.evaluate, shows what training taught, samples side by side, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_cli.demo.tiny import happy_score
from tests.conftest import run_cli_inprocess
from tests.trl_oracle import cpu_dpo_config, load_records

METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_eval(capsys, adapter: Path, data: Path, *flags) -> tuple[dict, str]:
    """(the --output JSON, stdout) of `dpo-cli eval`; flags must not include --output."""
    output = Path(adapter).parent / "eval.json"
    code, stdout, stderr = run_cli_inprocess(
        capsys, "eval", "--adapter", adapter, "--data", data, "--output", output, *flags
    )
    assert code == 0, stderr
    return json.loads(output.read_text()), stdout


def trl_evaluate(adapter_dir: Path, data: Path, batch_size: int, output_dir: Path, **dpo) -> dict[str, float]:
    """TRL 1.16's DPOTrainer.evaluate on the base loaded as eval loads it, the same adapter, reference = the base.

    `dpo` (beta, loss_type, label_smoothing, ...) overrides the adapter's recipe, as eval's flags and --set do."""
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_cli.model.adapter import load_base_tokenizer, load_policy, open_adapter

    adapter = open_adapter(adapter_dir)
    dataset = Dataset.from_list(load_records(data, limit=100_000))
    settings = {"beta": adapter.recipe.dpo.beta, "max_length": adapter.recipe.data.max_length, **dpo}
    args = cpu_dpo_config(output_dir, batch_size, **settings)
    trainer = DPOTrainer(
        model=load_policy(adapter), args=args, train_dataset=dataset, processing_class=load_base_tokenizer(adapter)
    )
    # Handed a PeftModel with an adapter loaded, TRL adds a frozen copy of it named "ref" as the reference (right for
    # re-training an adapter). Ours is the base; without "ref", TRL disables the adapters for its reference pass.
    trainer.model.delete_adapter("ref")
    # TRL casts *trainable* LoRA weights of a quantized model to bfloat16; eval loads them frozen, so they stay fp32.
    assert all(p.dtype == torch.float32 for name, p in trainer.model.named_parameters() if "lora_" in name)
    metrics = trainer.evaluate(eval_dataset=dataset)
    return {key: metrics[f"eval_{key}"] for key in METRICS}


def assert_equal_to_trl(capsys, adapter: Path, data: Path, batch_size: int, tmp_path: Path, *flags, **dpo) -> dict:
    """Our eval's metrics (with `flags`) equal TRL's evaluate (with `dpo`, the same settings in DPOConfig's words)."""
    # TRL averages rewards/* over batches (a mean of batch means) and weighs eval_loss per pair; with a batch size
    # that divides the pair count, both are the per-pair means dpo-cli reports.
    num_pairs = len(load_records(data, limit=100_000))
    assert num_pairs % batch_size == 0
    result, stdout = run_eval(capsys, adapter, data, "--batch-size", batch_size, *flags)
    ours = result["metrics"]
    assert ours["num_pairs"] == num_pairs
    theirs = trl_evaluate(adapter, data, batch_size, tmp_path / "trl", **dpo)
    for key in METRICS:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
    assert f"{ours['rewards/accuracies']:.4f}" in stdout and f"{ours['loss']:.4f}" in stdout  # the table
    return result


def test_eval_equals_trl_on_tiny_4bit_model(tiny_adapter, tiny_demo, tmp_path, capsys):
    ours = assert_equal_to_trl(capsys, tiny_adapter, tiny_demo["test"], 8, tmp_path)["metrics"]
    assert ours["rewards/margins"] != 0.0  # the adapter moved: policy and reference differ


@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_eval_under_other_settings_equals_trl(tiny_adapter, tiny_demo, tmp_path, capsys, loss_type, label_smoothing):
    """`eval --beta --set dpo.…` scores the adapter under settings it was not trained with, as TRL would."""
    flags = ["--beta", 0.2, "--set", f"dpo.loss_type={loss_type}", "--set", f"dpo.label_smoothing={label_smoothing}"]
    settings = {"beta": 0.2, "loss_type": [loss_type], "label_smoothing": label_smoothing}
    result = assert_equal_to_trl(capsys, tiny_adapter, tiny_demo["test"], 8, tmp_path, *flags, **settings)
    assert {key: result["dpo"][key] for key in settings} == settings  # the --output JSON says what was scored
    default, _ = run_eval(capsys, tiny_adapter, tiny_demo["test"], "--batch-size", 8)
    assert default["dpo"]["loss_type"] == ["sigmoid"] and default["dpo"]["beta"] == 0.1  # recipe.yaml unchanged
    assert result["metrics"]["loss"] != pytest.approx(default["metrics"]["loss"])  # the settings were used


@pytest.mark.slow
def test_eval_equals_trl_on_stories260k_4bit(stories_adapter, stories_data, tmp_path, capsys):
    assert_equal_to_trl(capsys, stories_adapter, stories_data["test"], 13, tmp_path)  # 117 pairs = 9 x 13


@pytest.mark.slow
def test_trained_adapter_ranks_test_pairs_and_samples_happier_stories(stories_adapter, stories_data, tmp_path, capsys):
    per_example, samples = tmp_path / "pairs.jsonl", tmp_path / "samples.jsonl"
    result, _ = run_eval(
        capsys,
        stories_adapter,
        stories_data["test"],
        "--batch-size", 39,
        "--per-example", per_example,
        "--generate", 117,
        "--max-new-tokens", 48,
        "--samples", samples,
    )  # fmt: skip
    metrics = result["metrics"]
    assert metrics["rewards/accuracies"] > 0.65, metrics  # chance is 0.5; this adapter scored 0.74 when written

    # One row per pair, pointing back at its line, adding up to the metrics.
    rows = read_jsonl(per_example)
    assert len(rows) == metrics["num_pairs"] == 117
    assert [row["source"] for row in rows] == [f"{stories_data['test']}:{n}" for n in range(1, 118)]
    assert sum(row["correct"] for row in rows) / len(rows) == pytest.approx(metrics["rewards/accuracies"])
    assert sum(row["loss"] for row in rows) / len(rows) == pytest.approx(metrics["loss"], rel=1e-6)
    for row in rows:
        assert row["margin"] == pytest.approx(row["reward_chosen"] - row["reward_rejected"])
        assert row["correct"] == (row["margin"] > 0)

    # The DPO paper's sentiment check in miniature: the policy's own stories are happier than the base model's.
    stories = read_jsonl(samples)
    assert len(stories) == 117 and len({row["prompt"] for row in stories}) == 117
    policy = sum(happy_score(row["policy"]) for row in stories) / len(stories)
    reference = sum(happy_score(row["reference"]) for row in stories) / len(stories)
    assert policy > reference + 0.5, (policy, reference)  # 1.56 against 0.14 when written


def test_samples_are_seeded(tiny_adapter, tiny_demo, tmp_path, capsys):
    def samples(name: str, seed: int) -> list[dict]:
        path = tmp_path / name
        flags = ("--generate", 5, "--max-new-tokens", 12, "--samples", path, "--seed", seed, "--batch-size", 4)
        run_eval(capsys, tiny_adapter, tiny_demo["test"], *flags)
        return read_jsonl(path)

    first = samples("a.jsonl", 0)
    assert len(first) == 5 and all(row["prompt"] and row["source"] for row in first)
    assert samples("b.jsonl", 0) == first
    assert [row["policy"] for row in samples("c.jsonl", 1)] != [row["policy"] for row in first]


def test_eval_bad_inputs_end_in_one_line(tiny_adapter, tiny_demo, narrower_tiny_model, tmp_path, capsys):
    data = tiny_demo["test"]
    (tmp_path / "empty").mkdir()

    cases = [
        (("--adapter", tmp_path / "missing", "--data", data), "adapter folder not found"),
        (("--adapter", tmp_path / "empty", "--data", data), "not an adapter folder (no adapter_config.json)"),
        (
            ("--adapter", tiny_adapter, "--data", data, "--model", narrower_tiny_model),
            f"error: {tiny_adapter}: adapter is for another base: model.layers.0.mlp.down_proj is 128->64 in the "
            f"adapter but 64->32 in {narrower_tiny_model}; pass --model with the base it was trained on",
        ),
        (("--adapter", tiny_adapter, "--data", data, "--generate", 2), "--generate needs --samples"),
        (
            ("--adapter", tiny_adapter, "--data", data, "--batch-size", 0),
            "recipe key training.eval_batch_size: 0 must be positive",
        ),
        (("--adapter", tiny_adapter, "--data", data, "--output", tmp_path), "is a folder"),
    ]
    for args, message in cases:
        code, stdout, stderr = run_cli_inprocess(capsys, "eval", *args)
        assert code == 2, (args, stdout, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.slow
def test_eval_refuses_a_deeper_base_the_adapter_only_partly_covers(stories_adapter, stories_model, tmp_path, capsys):
    # Every weight of the adapter fits this 6-layer copy of stories260K's shape, but PEFT would give its sixth layer
    # fresh LoRA weights (the adapter names modules by suffix, q_proj, ...): a different base, said in one line.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(stories_model)
    config.num_hidden_layers += 1
    deeper = tmp_path / "deeper"
    AutoModelForCausalLM.from_config(config).save_pretrained(deeper)
    AutoTokenizer.from_pretrained(stories_model).save_pretrained(deeper)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Once upon a time", "chosen": " a sun.", "rejected": " a rain."}) + "\n")
    code, _, stderr = run_cli_inprocess(capsys, "eval", "--adapter", stories_adapter, "--data", data, "--model", deeper)
    assert code == 2
    assert "adapter is for another base" in stderr and "(first: model.layers.5." in stderr, stderr


def test_jsonl_outputs_keep_one_record_per_line_for_any_reader(tmp_path):
    from dpo_cli.run.eval_adapter import write_jsonl

    # Byte-fallback tokenizers can sample any character, including those str.splitlines() breaks on.
    rows = [{"policy": "a\u2028b\x85c\u2029d", "reference": "é 中"}, {"policy": "plain"}]
    write_jsonl(tmp_path / "samples.jsonl", rows)
    assert read_jsonl(tmp_path / "samples.jsonl") == rows
    assert "é 中" in (tmp_path / "samples.jsonl").read_text(encoding="utf-8")  # readable, not \u-escaped


def test_eval_on_invalid_skip_writes_the_skipped_records_beside_its_output(tiny_adapter, tiny_demo, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    good = tiny_demo["test"].read_text(encoding="utf-8").splitlines()[:5]
    data.write_text("\n".join([*good[:2], '{"prompt": "p", "chosen": "same", "rejected": "same"}', *good[2:]]) + "\n")
    output = tmp_path / "out" / "eval.json"
    code, _, stderr = run_cli_inprocess(
        capsys, "eval", "--adapter", tiny_adapter, "--data", data, "--output", output, "--on-invalid", "skip"
    )
    assert code == 0, stderr
    assert json.loads(output.read_text())["metrics"]["num_pairs"] == 5
    skipped = read_jsonl(tmp_path / "out" / "skipped-eval.jsonl")
    assert len(skipped) == 1 and skipped[0]["source"].endswith("mixed.jsonl:3")
