"""TRL 1.16's DPOTrainer set up as our oracle: same model object, same adapter, reference = adapters disabled.

TRL wraps the base in PEFT from a `peft_config` (fresh LoRA, B = 0, so policy = reference). We then give the LoRA
weights deterministic non-zero values so policy and reference differ, and both tools score the same model object.
TRL casts trainable LoRA weights of a quantized model to bfloat16; we put them back to float32 to compare in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_records(path: Path, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(limit), strict=False)]


def cpu_dpo_config(output_dir: Path, batch_size: int, **config):
    """TRL's DPOConfig for comparing with us on CPU: float32, no checkpointing, no loggers, one batch size."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        **config,
    )


def make_trl_trainer(model, tokenizer, records: list[dict], output_dir: Path, lora_seed: int = 0, **config):
    """A DPOTrainer over `records` whose policy is `model` + a seeded random LoRA adapter."""
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_cli.config import LoraSection
    from dpo_cli.model.load import lora_config

    args = cpu_dpo_config(output_dir, len(records), **config)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora_config(LoraSection()),
    )
    randomize_lora(trainer.model, lora_seed)
    return trainer


def randomize_lora(model, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale


def trl_batch(trainer, count: int):
    """TRL's own collated batch of its first `count` training rows."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(count)])


def trl_train_metrics(trainer, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, TRL's logged metrics) of one training-mode compute_loss call."""
    trainer._metrics["train"].clear()
    model.train()
    loss = trainer.compute_loss(model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss, metrics
