"""`dpo-cli sft` steps equal TRL 1.16's SFTTrainer on 4-bit stories260K, the same data and LoRA initialisation.

Both train 5 steps from the same adapter weights (TRL's seeded random LoRA, copied into ours), on the same 8
examples per step: stories-happy pairs, read by us as a preference file (the chosen completion is the target) and
handed to TRL as prompt/completion records. The loss is on the completion tokens only, TRL's default for
prompt/completion data. Step 1's loss equals TRL's to 1e-5 (the same weights, the same tokens); the loss and the
gradient norm stay within 1e-3 for 5 steps (AdamW's updates differ only by float rounding). Padded and packed, each
against TRL's own padded and packed (best-fit decreasing, padding-free) runs.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.trl_oracle import load_records, randomize_lora

EXAMPLES = 8
STEPS = 5
MAX_LENGTH = 128
LR = 5e-3  # large enough that 5 steps move the adapter well away from where it started


def _trl_steps(model_path, records, tmp_path, packed: bool):
    """(per-step losses, per-step gradient norms before clipping, the initial LoRA weights) of TRL's SFTTrainer."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from dpo_cli.config import LoraSection, ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer, lora_config

    tokenizer = load_tokenizer(str(model_path))
    base = load_base_model(ModelSection(path=str(model_path), gradient_checkpointing=False), torch.device("cpu"))
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=EXAMPLES,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        max_length=MAX_LENGTH,
        packing=packed,
        seed=42,
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in records])
    trainer = SFTTrainer(
        model=base, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(LoraSection())
    )
    randomize_lora(trainer.model, seed=0)  # also back to float32: TRL keeps a 4-bit base's LoRA in bfloat16
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    losses = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(*a, **k):
        loss = compute_loss(*a, **k)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording_compute_loss  # the logged loss is rounded; this is the value backpropagated
    trainer.train()
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]  # before clipping
    return losses, norms, initial


def _our_steps(model_path, data_file, tmp_path, layout: str, initial: dict):
    """(per-step records) of `dpo-cli sft`'s own run (build_run, train_step) from TRL's initial adapter."""
    from rich.console import Console

    from dpo_cli.config import recipe_from_dict
    from dpo_cli.run.loop import train_step
    from dpo_cli.run.setup import build_run

    recipe = recipe_from_dict(
        {
            "model": {"path": str(model_path), "gradient_checkpointing": False},
            "data": {"train": [str(data_file)], "layout": layout, "max_length": MAX_LENGTH},
            "training": {
                "objective": "sft",
                "output_dir": str(tmp_path / f"ours-{layout}"),
                "max_steps": STEPS,
                "batch_size": EXAMPLES,
                "lr": LR,
                "scheduler": "linear",
                "warmup_ratio": 0.0,
                "save_steps": 0,
            },
        }
    )
    run = build_run(recipe, console=Console(quiet=True))
    assert run.layout == layout
    ours = dict(run.model.named_parameters())
    assert set(initial) == {name for name in ours if "lora_" in name}
    with torch.no_grad():
        for name, value in initial.items():
            ours[name].copy_(value)
    return [train_step(run) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def stories_examples(stories_data, tmp_path_factory):
    records = load_records(stories_data["train"], EXAMPLES)
    path = tmp_path_factory.mktemp("sft-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records, path


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sft_steps_equal_trl_sfttrainer(stories_model, stories_examples, tmp_path, monkeypatch, layout):
    monkeypatch.setenv("DPO_CLI_CACHE", str(tmp_path / "cache"))
    records, data_file = stories_examples
    trl_losses, trl_norms, initial = _trl_steps(stories_model, records, tmp_path, packed=layout == "packed")
    ours = _our_steps(stories_model, data_file, tmp_path, layout, initial)
    assert len(trl_losses) == len(trl_norms) == STEPS
    assert ours[0]["loss"] == pytest.approx(trl_losses[0], abs=1e-5)
    for step, (mine, loss, norm) in enumerate(zip(ours, trl_losses, trl_norms, strict=True), start=1):
        assert mine["loss"] == pytest.approx(loss, abs=1e-3), f"step {step} loss"
        assert mine["grad_norm"] == pytest.approx(norm, abs=1e-3), f"step {step} grad norm"
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05, "the adapter moves, so later steps compare a trained one"
