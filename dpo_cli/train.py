"""The training loop: DPO on LoRA adapters over a frozen (4-bit) base.

The data is read as one stream of micro-batches over epochs, each epoch in its own seeded order; optimizer step k
consumes micro-batches [k*grad_accum, (k+1)*grad_accum). That single number (micro-batches done) is the whole data
position, which is what makes `--resume` replay exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpo_cli.attention import resolve_layout
from dpo_cli.batching import collate, pair_tokens, token_budget_batches
from dpo_cli.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from dpo_cli.config import RECIPE_FILENAME, Recipe
from dpo_cli.distributed import check_single_process, is_main_process
from dpo_cli.errors import UserError
from dpo_cli.evaluate import evaluate_pairs
from dpo_cli.files import move_files_into, write_text_atomic
from dpo_cli.metrics import MetricsLog, PairMetrics, is_finite
from dpo_cli.model import add_lora, load_base_model, load_tokenizer, resolve_device, trainable_parameters
from dpo_cli.objective import score_batch
from dpo_cli.reference import PAIR_KEYS, precompute_reference_logps, with_reference
from dpo_cli.tokenization import load_tokenized_split

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(UserError):
    exit_code = 3


class TrainingInterrupted(UserError):
    exit_code = 130


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    records: list[dict] = field(default_factory=list)
    final_eval: dict[str, float] | None = None


@dataclass
class DataStream:
    """Micro-batch m of the endless stream is micro-batch (m mod per_epoch) of epoch (m div per_epoch).

    Each epoch shuffles the pairs into `batch_size` slices, or, with `budget_batches` (--max-tokens-per-batch),
    shuffles the order of those fixed micro-batches."""

    num_pairs: int
    batch_size: int
    seed: int
    budget_batches: list[list[int]] | None = None

    @property
    def per_epoch(self) -> int:
        if self.budget_batches is not None:
            return len(self.budget_batches)
        return math.ceil(self.num_pairs / self.batch_size)

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.budget_batches is not None:
            order = torch.randperm(self.per_epoch, generator=generator)
            return list(self.budget_batches[int(order[position])])
        order = torch.randperm(self.num_pairs, generator=generator)
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()


def tokens_per_pair(pairs) -> list[int]:
    """`pair_tokens` of each pair of a tokenized split, from Arrow list lengths: no token id becomes a Python int."""
    import pyarrow.compute as pc

    counts: list[int] = []
    for table in pairs.with_format("arrow").iter(batch_size=8192):
        lengths = [pc.list_value_length(table.column(key)).to_numpy() for key in PAIR_KEYS]
        counts.extend(int(n) for n in pair_tokens(*lengths))
    return counts


def total_steps(recipe: Recipe, stream: DataStream) -> int:
    training = recipe.training
    if training.max_steps:
        return training.max_steps
    return max(1, math.ceil(training.epochs * stream.per_epoch / training.grad_accum))


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _prepare_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; refuses to overwrite a finished or running earlier run."""
    if not str(output_dir):
        raise UserError("no output folder: pass --output-dir DIR or set training.output_dir in the recipe")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder; pick another --output-dir")
    checkpoint = latest_checkpoint(output_dir)
    if resume:
        return checkpoint
    if checkpoint is not None or (output_dir / "adapter_config.json").exists() or (output_dir / METRICS_FILE).exists():
        raise UserError(
            f"{output_dir}: holds an earlier run; pass --resume to continue it or pick another --output-dir"
        )
    return None


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process(),
    )


class Trainer:
    def __init__(self, recipe: Recipe, console: Console | None = None, resume: bool = False):
        check_single_process()
        self.recipe = recipe
        self.console = console or Console()
        self.output_dir = Path(recipe.training.output_dir)
        self.resume_from = _prepare_output_dir(self.output_dir, resume)
        if resume and self.resume_from is None:
            self.console.print(f"no checkpoint in {self.output_dir}; starting from the beginning")
        _set_seed(recipe.training.seed)
        self.device = resolve_device(recipe.model.device)
        self.tokenizer = load_tokenizer(recipe.model.path, recipe.model.trust_remote_code)
        max_length = recipe.data.max_length
        self.train_pairs, self.train_summary = load_tokenized_split(
            self.tokenizer, recipe.data.train, max_length, "train", self.console, recipe.data, self.output_dir
        )
        self.eval_pairs = None
        if recipe.data.eval or recipe.data.eval_split:
            self.eval_pairs, _ = load_tokenized_split(
                self.tokenizer, recipe.data.eval, max_length, "eval", self.console, recipe.data, self.output_dir
            )
        base = load_base_model(recipe.model, self.device)
        self.model = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing)
        self.model.train()
        self.layout, fallback_note = resolve_layout(recipe.data.layout, self.model, max_length)
        if fallback_note:
            self.console.print(fallback_note)
        self.train_ref_logps = None  # (num_pairs, 2) with dpo.precompute_ref: the steps then skip the reference pass
        if recipe.dpo.precompute_ref:
            self.train_ref_logps = precompute_reference_logps(
                self.model,
                self.train_pairs,
                self.tokenizer.pad_token_id,
                recipe.dpo,
                recipe.training.eval_batch_size,
                self.console,
                layout=self.layout,
            )
        params = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(params, lr=recipe.training.lr, weight_decay=recipe.training.weight_decay)
        budget = recipe.training.max_tokens_per_batch
        budget_batches = token_budget_batches(tokens_per_pair(self.train_pairs), budget) if budget else None
        self.stream = DataStream(
            len(self.train_pairs), recipe.training.batch_size, recipe.training.seed, budget_batches
        )
        self.total_steps = total_steps(recipe, self.stream)
        warmup = int(recipe.training.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_lambda(step, self.total_steps, warmup, recipe.training.scheduler)
        )
        self.state = TrainerState(step=0, micro_batches_done=0, total_steps=self.total_steps)
        self.metrics_log = MetricsLog(self.output_dir / METRICS_FILE)
        if self.resume_from is not None:
            self.state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
            self.state.total_steps = self.total_steps
            self.metrics_log.truncate_after(self.state.step)
            self.console.print(f"resuming from {self.resume_from} (step {self.state.step})")
        elif resume:  # a run that died before its first checkpoint: its metric lines would repeat steps
            self.metrics_log.truncate_after(0)
        n_params = sum(p.numel() for p in params)
        self.console.print(
            f"trainable LoRA parameters: {n_params:,}; {self.total_steps} optimizer steps on {self.device}"
        )

    # One optimizer step -------------------------------------------------------------------------------------------

    def _step_batches(self) -> list[list[int]]:
        first = self.state.micro_batches_done
        return [self.stream.indices(m) for m in range(first, first + self.recipe.training.grad_accum)]

    def _pairs(self, indices: list[int]) -> list:
        if self.train_ref_logps is None:
            return [self.train_pairs[i] for i in indices]
        return [with_reference(self.train_pairs[i], self.train_ref_logps[i]) for i in indices]

    def train_step(self) -> dict:
        started = time.perf_counter()
        batches = self._step_batches()
        pairs_in_step = sum(len(b) for b in batches)
        metrics = PairMetrics()
        tokens = 0
        for indices in batches:
            batch = collate(self.layout, self._pairs(indices), self.tokenizer.pad_token_id).to(self.device)
            scores = score_batch(self.model, batch, self.recipe.dpo)
            loss_sum = float(scores.losses.detach().sum())
            if not is_finite(loss_sum):
                raise TrainingDiverged(
                    f"step {self.state.step + 1}: the loss is {loss_sum}; training stopped, the last good checkpoint "
                    "is kept. Lower --lr or --beta, or check the data"
                )
            # Each pair weighs the same in the step's gradient, however the pairs are split into micro-batches.
            (scores.losses.sum() / pairs_in_step).backward()
            metrics.add(
                scores.losses,
                scores.chosen_rewards,
                scores.rejected_rewards,
                scores.logps.chosen,
                scores.logps.rejected,
            )
            tokens += batch.num_tokens
        learning_rate = self.scheduler.get_last_lr()[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.recipe.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.micro_batches_done += len(batches)
        self.state.num_tokens += tokens
        elapsed = time.perf_counter() - started
        return {
            "step": self.state.step,
            "epoch": round(self.state.micro_batches_done / self.stream.per_epoch, 4),
            **metrics.means(),
            "grad_norm": float(grad_norm),
            "learning_rate": learning_rate,
            "tokens_per_second": tokens / elapsed,
            "num_tokens": self.state.num_tokens,
        }

    # The loop -----------------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        training = self.recipe.training
        metrics = evaluate_pairs(
            self.model,
            self.eval_pairs,
            self.tokenizer.pad_token_id,
            self.recipe.dpo,
            training.eval_batch_size,
            layout=self.layout,
        )
        return {f"eval_{key}": value for key, value in metrics.items()}

    def save_checkpoint(self) -> Path | None:
        if not is_main_process():
            return None
        training = self.recipe.training
        return save_checkpoint(
            self.output_dir, self.model, self.optimizer, self.scheduler, self.state, training.save_total_limit
        )

    def run(self) -> TrainResult:
        training = self.recipe.training
        result = TrainResult(self.output_dir, self.state.step)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.recipe.save(self.output_dir / RECIPE_FILENAME)
        last_saved = self.state.step
        with _progress(self.console) as progress:
            task = progress.add_task(
                "train", total=self.total_steps, completed=self.state.step, loss="-", acc="-", tps="-"
            )
            try:
                while self.state.step < self.total_steps:
                    record = self.train_step()
                    if self.eval_pairs and training.eval_steps and self.state.step % training.eval_steps == 0:
                        record.update(self.evaluate())
                    self.metrics_log.write(record)
                    result.records.append(record)
                    progress.update(
                        task,
                        completed=self.state.step,
                        loss=f"{record['loss']:.4f}",
                        acc=f"{record['rewards/accuracies']:.2f}",
                        tps=f"{record['tokens_per_second']:.0f}",
                    )
                    if training.save_steps and self.state.step % training.save_steps == 0:
                        self.save_checkpoint()
                        last_saved = self.state.step
            except KeyboardInterrupt:
                progress.stop()
                if self.state.step > last_saved:
                    self.save_checkpoint()
                raise TrainingInterrupted(
                    f"interrupted at step {self.state.step}; checkpoint saved in {self.output_dir}, "
                    "continue with the same command and --resume"
                ) from None
        if self.state.step > last_saved:
            self.save_checkpoint()
        if self.eval_pairs:
            result.final_eval = self.evaluate()
            self.metrics_log.write({"step": self.state.step, **result.final_eval})
        self.save_final()
        result.steps = self.state.step
        return result

    def save_final(self) -> None:
        """The standard PEFT adapter folder, plus tokenizer and resolved recipe, each file renamed into place."""
        if not is_main_process():
            return
        staging = self.output_dir / ".final.tmp"
        staging.mkdir(exist_ok=True)
        self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        move_files_into(staging, self.output_dir)
        write_text_atomic(
            self.output_dir / "train_summary.txt",
            f"pairs: {self.train_summary.kept}\n"
            f"dropped (prompt fills max_length): {len(self.train_summary.dropped_long_prompt)}\n"
            f"truncated completions: {self.train_summary.truncated}\n"
            f"steps: {self.state.step}\n",
        )


def train(recipe: Recipe, resume: bool = False, console: Console | None = None) -> TrainResult:
    return Trainer(recipe, console=console, resume=resume).run()
