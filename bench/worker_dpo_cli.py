"""bench_train.py's dpo-cli worker: a user's run, `build_run(recipe)` then `fit(run, callbacks)`.

The data is read front to back (`InOrder`, TRL's sequential order), and one bench callback (`StepClock`) stamps the
end of each optimizer step and measures the peak memory of the measured steps.
"""

from __future__ import annotations

import os
import sys
import time

import benchlib
from train_workers import InOrder, Spec, WorkerResult, absolute_peak_mib, batch_digest, memory_window, write_profile

from dpo_cli.run.callbacks import Callback


class StepClock(Callback):
    """A `fit` callback: the end of each optimizer step (wall and CPU clocks, after a device sync), each step's
    loss, and the peak memory over `window`, the 0-based steps measured (see `memory_window`)."""

    def __init__(self, spec: Spec, device, window: tuple[int, int]):
        self.spec, self.device, (self.first, self.last) = spec, device, window
        self.memory = benchlib.PeakMemory(device)
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.losses: list[float] = []

    def on_step_begin(self, run) -> None:
        if run.state.step == self.first:
            self.memory.__enter__()

    def on_step_end(self, run, record: dict) -> None:
        benchlib.sync(self.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.losses.append(record["loss"])
        if run.state.step - 1 == self.last:
            self.memory.__exit__(None, None, None)
            write_profile(self.spec, self.memory)


def dpo_cli_recipe(spec: Spec):
    """The recipe of the benchmark's settings: a constant schedule, no checkpoints, no evaluation."""
    from dpo_cli.config import DataSection, DpoSection, LoraSection, ModelSection, Recipe, TrainingSection

    return Recipe(
        model=ModelSection(
            path=spec.model_path,
            quantize=spec.quantize,
            compute_dtype=spec.compute_dtype,
            gradient_checkpointing=spec.gradient_checkpointing,
            compile=spec.compile,
            device=spec.device,
        ),
        lora=LoraSection(r=spec.lora_r, alpha=spec.lora_alpha),
        data=DataSection(train=[spec.data_path], max_length=spec.max_length, layout=spec.layout),
        training=TrainingSection(
            output_dir=spec.output_dir,
            max_steps=spec.total_steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            scheduler="constant",
            warmup_ratio=0.0,
            save_steps=0,
            seed=spec.seed,
        ),
        # TRL's DPOTrainer scores the reference live (precompute_ref_log_probs=False): so does this run unless
        # --precompute-ref asks for dpo-cli's cached reference, whatever `auto` would pick.
        dpo=DpoSection(beta=spec.beta, precompute_ref="true" if spec.precompute_ref else "false"),
    )


def _dpo_cli_digests(run, steps: int) -> tuple[list[str], list[int]]:
    """(digest, real tokens) of each step's micro-batch, collated padded as TRL collates."""
    from dpo_cli.dpo.layouts import collate_padded

    digests, tokens = [], []
    for step in range(steps):
        pairs = [run.train_pairs[i] for i in run.stream.indices(step)]
        batch = collate_padded(pairs, run.tokenizer.pad_token_id)
        digest, count = batch_digest(batch.input_ids, batch.attention_mask)
        digests.append(digest)
        tokens.append(count)
    return digests, tokens


def run_dpo_cli(spec: Spec) -> WorkerResult:
    """A user's run: `build_run`, then `fit` with the metrics log, which is what a run does each step besides the
    progress bar (no checkpoints: save_steps=0 leaves the one save to after the timed steps, so it is left out)."""
    import torch
    from rich.console import Console

    from dpo_cli.model.attention_support import resolve_layout
    from dpo_cli.run.callbacks import MetricsLogger
    from dpo_cli.run.loop import fit
    from dpo_cli.run.setup import build_run

    device = torch.device(spec.device)
    started = time.perf_counter()
    run = build_run(dpo_cli_recipe(spec), console=Console(file=sys.stderr, quiet=True))
    run.stream = InOrder(len(run.train_pairs), spec.batch_size)
    setup_seconds = time.perf_counter() - started
    rss_before = benchlib.current_rss_mib()
    clock = StepClock(spec, device, memory_window(spec))
    load = [os.getloadavg()[0]]
    try:
        fit(run, [MetricsLogger(), clock])
    finally:
        run.metrics_log.close()
    load.append(os.getloadavg()[0])
    digests, tokens = _dpo_cli_digests(run, spec.total_steps)
    return WorkerResult(
        tool="dpo-cli",
        step_ends=clock.ends,
        cpu_ends=clock.cpu_ends,
        load_average=load,
        tokens_per_step=tokens,
        pairs_per_step=[spec.batch_size] * spec.total_steps,
        digests=digests,
        losses=clock.losses,
        trainable_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        peak_step_mib=clock.memory.peak_mib,
        absolute_peak_mib=absolute_peak_mib(device),
        rss_before_training_mib=rss_before,
        setup_seconds=setup_seconds,
        layout=run.layout,
        auto_layout=resolve_layout("auto", run.model, spec.max_length)[0],
    )
