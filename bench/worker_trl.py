"""bench_train.py's TRL worker: TRL 1.16's `DPOTrainer.train()` on the same base, adapter, data and settings, with a
callback that stamps the end of each optimizer step as the dpo-cli worker's does."""

from __future__ import annotations

import os
import time
from pathlib import Path

import benchlib
from train_inputs import read_records
from train_workers import Spec, WorkerResult, absolute_peak_mib, batch_digest, memory_window, write_profile


def _trl_config(spec: Spec, bf16: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=spec.output_dir,
        report_to=[],
        use_cpu=spec.device == "cpu",
        bf16=bf16,
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_length=spec.max_length,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec.beta,
        max_steps=spec.total_steps,
        logging_steps=1,  # per-step metrics, as dpo-cli records each step
        save_strategy="no",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=spec.seed,
    )


def _trl_trainer(spec: Spec, device):
    """(DPOTrainer over the same base, adapter and data file, notes on what was changed to match dpo-cli)."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_cli.config import LoraSection, ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer, lora_config

    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model_path)
    model_section = ModelSection(
        path=spec.model_path,
        quantize=spec.quantize,
        compute_dtype=spec.compute_dtype,
        gradient_checkpointing=spec.gradient_checkpointing,
        device=spec.device,
    )
    model = load_base_model(model_section, device)
    trainer = DPOTrainer(
        model=model,
        args=_trl_config(spec, model.dtype == torch.bfloat16),
        train_dataset=Dataset.from_list(read_records(Path(spec.data_path))),
        processing_class=tokenizer,
        peft_config=lora_config(LoraSection(r=spec.lora_r, alpha=spec.lora_alpha)),
    )
    notes = []
    if spec.trl_lora_fp32:
        # TRL casts a quantized model's LoRA weights to bfloat16; put them back so both tools train fp32 adapters.
        cast = 0
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                cast += 1
        if cast:
            notes.append(f"TRL's {cast} bfloat16 LoRA tensors cast back to float32")
    return trainer, notes


def _trl_step_clock(spec: Spec, device, window: tuple[int, int]):
    """TRL's `StepClock`: the same stamps and memory window, from a transformers TrainerCallback."""
    from transformers import TrainerCallback

    first, last = window

    class TrlStepClock(TrainerCallback):
        def __init__(self):
            self.memory = benchlib.PeakMemory(device)
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and device.type == "cpu":
                self.memory.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            benchlib.sync(device)
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())
            step = state.global_step - 1
            if step == first - 1 and device.type == "cuda":
                self.memory.__enter__()
            if step == last:
                self.memory.__exit__(None, None, None)
                write_profile(spec, self.memory)

    return TrlStepClock()


def _trl_digests(trainer, spec: Spec) -> tuple[list[str], list[int]]:
    digests, tokens = [], []
    for step in range(spec.total_steps):
        rows = [trainer.train_dataset[i] for i in range(step * spec.batch_size, (step + 1) * spec.batch_size)]
        batch = trainer.data_collator(rows)
        digest, count = batch_digest(batch["input_ids"], batch["attention_mask"])
        digests.append(digest)
        tokens.append(count)
    return digests, tokens


def run_trl(spec: Spec) -> WorkerResult:
    import torch

    device = torch.device(spec.device)
    started = time.perf_counter()
    trainer, notes = _trl_trainer(spec, device)
    clock = _trl_step_clock(spec, device, memory_window(spec))
    trainer.add_callback(clock)
    setup_seconds = time.perf_counter() - started
    rss_before = benchlib.current_rss_mib()
    load = [os.getloadavg()[0]]
    trainer.train()
    load.append(os.getloadavg()[0])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][: spec.total_steps]
    digests, tokens = _trl_digests(trainer, spec)
    return WorkerResult(
        tool="trl",
        step_ends=clock.ends,
        cpu_ends=clock.cpu_ends,
        load_average=load,
        tokens_per_step=tokens,
        pairs_per_step=[spec.batch_size] * spec.total_steps,
        digests=digests,
        losses=losses,
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        peak_step_mib=clock.memory.peak_mib,
        absolute_peak_mib=absolute_peak_mib(device),
        rss_before_training_mib=rss_before,
        setup_seconds=setup_seconds,
        notes=notes,
    )
