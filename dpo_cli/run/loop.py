"""The training loop: DPO on LoRA adapters over a frozen (4-bit) base.

The data is read as one stream of micro-batches over epochs, each epoch in its own seeded order; optimizer step k
consumes micro-batches [k*grad_accum, (k+1)*grad_accum). That single number (micro-batches done) is the whole data
position, which is what makes `--resume` replay exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpo_cli.config import RECIPE_FILENAME, Recipe
from dpo_cli.data.split import training_requests
from dpo_cli.dpo.layouts import collate, pair_tokens, token_budget_batches
from dpo_cli.dpo.scoring import score_batch
from dpo_cli.errors import UserError
from dpo_cli.files import disk_full_as_user_error, move_files_into, remove_stale_temporaries, write_text_atomic
from dpo_cli.model.attention_support import resolve_layout
from dpo_cli.model.load import (
    IGNORED_RECIPE_TRUST,
    add_lora,
    load_base_model,
    load_tokenizer,
    resolve_device,
    scoring_model,
    trainable_parameters,
)
from dpo_cli.output_folder import check_folder_is_ours, check_placeable, claimed_folder, honour_umask, is_within
from dpo_cli.run import interrupts
from dpo_cli.run.checkpoint import (
    TrainerState,
    apply_schedule,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    remove_stale_checkpoint_temporaries,
    save_checkpoint,
)
from dpo_cli.run.data_report import load_split
from dpo_cli.run.distributed import check_single_process, is_main_process
from dpo_cli.run.evaluate import evaluate_pairs
from dpo_cli.run.metrics import MetricsLog, PairMetrics, is_finite
from dpo_cli.run.reference import PAIR_KEYS, precompute_reference_logps
from dpo_cli.run.report import write_run_report
from dpo_cli.run.resume_settings import (
    TRAIN_PAIRS,
    changeable_settings,
    changed_settings,
    fixed_settings,
    refuse_changed_fixed_settings,
)
from dpo_cli.run.trackers import Trackers

METRICS_FILE = "metrics.jsonl"
FINAL_STAGING = "final"
"""Staging folder of the final adapter files: `.final.{pid}.{random}.tmp` in the output folder."""
OUR_TEMPORARIES = r"final|metrics\.jsonl|recipe\.yaml|train_summary\.txt|skipped-\w+\.jsonl"
"""What a killed run may leave as `.NAME.{pid}.{random}.tmp` in its output folder (see files.py)."""
RESUME_HINT = "rerun with --resume"


class TrainingDiverged(UserError):
    exit_code = 3


class TrainingInterrupted(UserError):
    exit_code = 130


def _divergence_hint(recipe: Recipe) -> str:
    return (
        f"training stopped, the last good checkpoint is kept. Lower --lr (now {recipe.training.lr:g}) or --beta "
        f"(now {recipe.dpo.beta:g}), or check the data"
    )


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


def check_output_dir(recipe: Recipe) -> Path:
    """The output folder, if the run may write there: named, placeable, not an input's, empty or an earlier run."""
    if not recipe.training.output_dir.strip():  # Path("") would be ".", the current folder
        raise UserError("no output folder: pass --output-dir DIR or set training.output_dir in the recipe")
    output_dir = Path(recipe.training.output_dir)
    check_placeable(output_dir, "--output-dir")
    model = Path(recipe.model.path)
    if recipe.model.path and model.is_dir() and (is_within(output_dir, model) or is_within(model, output_dir)):
        raise UserError(
            f"--output-dir {output_dir}: is or holds the base model's folder {model}; pick a folder of its own"
        )
    for path in (*recipe.data.train, *recipe.data.eval, recipe.data.chat_template):
        if path and is_within(path, output_dir):
            raise UserError(f"--output-dir {output_dir}: holds the input file {path}; pick a folder of its own")
    check_folder_is_ours(output_dir, "train", "--output-dir", " or an earlier train run's; pick another --output-dir")
    return output_dir


def _prepare_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; refuses to overwrite a finished or running earlier run."""
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
    def __init__(
        self, recipe: Recipe, console: Console | None = None, resume: bool = False, trust_remote_code: bool = False
    ):
        check_single_process()
        self.recipe = recipe
        self.console = console or Console()
        if recipe.model.trust_remote_code and not trust_remote_code:
            self.console.print(f"[yellow]{IGNORED_RECIPE_TRUST}[/yellow]")
        recipe.model.trust_remote_code = trust_remote_code  # the saved recipe records what this command granted
        self.output_dir = Path(recipe.training.output_dir)
        self.resume_from = _prepare_output_dir(self.output_dir, resume)
        self.trackers = Trackers(self.output_dir, recipe.report, recipe.to_dict())  # a missing package fails here
        if resume and self.resume_from is None:
            self.console.print(f"no checkpoint in {self.output_dir}; starting from the beginning")
        self._remove_stale_temporaries()
        self.fixed_settings = fixed_settings(recipe)
        self.saved_state = None
        if self.resume_from is not None:  # before any model is loaded: a changed setting fails in seconds
            self.saved_state = read_state(self.resume_from)
            refuse_changed_fixed_settings(self.resume_from, self.saved_state.fixed_settings, self.fixed_settings)
        _set_seed(recipe.training.seed)
        self.device = resolve_device(recipe.model.device)
        self.tokenizer = load_tokenizer(recipe.model.path, trust_remote_code)
        max_length = recipe.data.max_length
        train_request, eval_request = training_requests(recipe.data, self.output_dir)
        self.train_pairs, self.train_summary = load_split(self.tokenizer, train_request, self.console)
        self.eval_pairs = None
        if eval_request is not None:
            self.eval_pairs, _ = load_split(self.tokenizer, eval_request, self.console)
        self.fixed_settings[TRAIN_PAIRS] = len(self.train_pairs)
        if self.saved_state is not None:  # the same files can still give other pairs (a changed tokenizer)
            refuse_changed_fixed_settings(
                self.resume_from,
                self.saved_state.fixed_settings,
                {TRAIN_PAIRS: self.fixed_settings[TRAIN_PAIRS]},
            )
        base = load_base_model(recipe.model, self.device, trust_remote_code)
        self.model = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing)
        self.model.train()
        self.scoring = scoring_model(self.model)
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

        def multiplier(step: int) -> float:
            return lr_lambda(step, self.total_steps, warmup, recipe.training.scheduler)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)
        self.state = self._new_state()
        self.metrics_log = MetricsLog(self.output_dir / METRICS_FILE, self.trackers)
        if self.resume_from is not None:
            saved = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
            training = recipe.training
            apply_schedule(self.optimizer, self.scheduler, training.lr, training.weight_decay, multiplier)
            self.state.step, self.state.micro_batches_done = saved.step, saved.micro_batches_done
            self.state.num_tokens = saved.num_tokens
            with disk_full_as_user_error(f"{self.metrics_log.path}", RESUME_HINT):
                self.metrics_log.truncate_after(self.state.step)
            self.console.print(f"resuming from {self.resume_from} (step {self.state.step})")
            changes = changed_settings(saved.changeable_settings, self.state.changeable_settings)
            if changes:
                self.console.print(
                    f"resuming with changed settings, applied from step {saved.step + 1}: " + ", ".join(changes)
                )
        elif resume:  # a run that died before its first checkpoint: its metric lines would repeat steps
            with disk_full_as_user_error(f"{self.metrics_log.path}", RESUME_HINT):
                self.metrics_log.truncate_after(0)
        n_params = sum(p.numel() for p in params)
        self.console.print(
            f"trainable LoRA parameters: {n_params:,}; {self.total_steps} optimizer steps on {self.device}"
        )
        interrupts.raise_if_received()  # an interrupt a library swallowed while loading

    def _new_state(self) -> TrainerState:
        return TrainerState(
            step=0,
            micro_batches_done=0,
            total_steps=self.total_steps,
            fixed_settings=self.fixed_settings,
            changeable_settings=changeable_settings(self.recipe),
        )

    def _remove_stale_temporaries(self) -> None:
        """What saves killed in an earlier run left (a lock on the folder must be held before this)."""
        if is_main_process():
            remove_stale_checkpoint_temporaries(self.output_dir)
            remove_stale_temporaries(self.output_dir, OUR_TEMPORARIES)

    # One optimizer step -------------------------------------------------------------------------------------------

    def _step_batches(self) -> list[list[int]]:
        first = self.state.micro_batches_done
        return [self.stream.indices(m) for m in range(first, first + self.recipe.training.grad_accum)]

    def _ref_logps(self, indices: list[int]) -> torch.Tensor | None:
        """(P, 2) the precomputed reference log-probs of these pairs, or None: score_batch runs the reference."""
        return None if self.train_ref_logps is None else self.train_ref_logps[indices]

    def train_step(self) -> dict:
        started = time.perf_counter()
        batches = self._step_batches()
        pairs_in_step = sum(len(b) for b in batches)
        metrics = PairMetrics()
        tokens = 0
        for indices in batches:
            pairs = [self.train_pairs[i] for i in indices]
            batch = collate(self.layout, pairs, self.tokenizer.pad_token_id).to(self.device)
            scores = score_batch(self.scoring, batch, self.recipe.dpo, self._ref_logps(indices))
            loss_sum = float(scores.losses.detach().sum())
            if not is_finite(loss_sum):
                raise TrainingDiverged(
                    f"step {self.state.step + 1}: the loss is {loss_sum}; {_divergence_hint(self.recipe)}"
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
        params = trainable_parameters(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.recipe.training.max_grad_norm)
        if not is_finite(grad_norm):  # clipping cannot rescue it: inf * 0 is nan, and the update would be nan
            raise TrainingDiverged(
                f"step {self.state.step + 1}: the gradient norm is {float(grad_norm)}, so the step was not taken; "
                + _divergence_hint(self.recipe)
            )
        self.optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in params):  # checked here, so no checkpoint is ever non-finite
            raise TrainingDiverged(
                f"step {self.state.step + 1}: the adapter weights became non-finite after the update; "
                + _divergence_hint(self.recipe)
            )
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
        with disk_full_as_user_error(f"the checkpoint of step {self.state.step}", RESUME_HINT):
            path = save_checkpoint(
                self.output_dir, self.model, self.optimizer, self.scheduler, self.state, training.save_total_limit
            )
        write_run_report(self.output_dir)  # report.png: the curves so far, at every checkpoint
        return path

    def _write_metrics(self, record: dict) -> None:
        with disk_full_as_user_error(f"{self.metrics_log.path} (step {record['step']})", RESUME_HINT):
            self.metrics_log.write(record)

    def run(self) -> TrainResult:
        training = self.recipe.training
        result = TrainResult(self.output_dir, self.state.step)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with disk_full_as_user_error(str(self.output_dir / RECIPE_FILENAME), "rerun"):
            self.recipe.save(self.output_dir / RECIPE_FILENAME)
        last_saved = self.state.step
        with _progress(self.console) as progress:
            task = progress.add_task(
                "train", total=self.total_steps, completed=self.state.step, loss="-", acc="-", tps="-"
            )
            try:
                while self.state.step < self.total_steps:
                    interrupts.raise_if_received()  # in case a library swallowed the KeyboardInterrupt
                    record = self.train_step()
                    if self.eval_pairs and training.eval_steps and self.state.step % training.eval_steps == 0:
                        record.update(self.evaluate())
                    self._write_metrics(record)
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
                signal_name = interrupts.received() or "SIGINT"
                raise TrainingInterrupted(
                    f"interrupted at step {self.state.step} by {signal_name}; checkpoint saved in {self.output_dir}, "
                    "continue with the same command and --resume"
                ) from None
        if self.state.step > last_saved:
            self.save_checkpoint()
        if self.eval_pairs:
            result.final_eval = self.evaluate()
            self._write_metrics({"step": self.state.step, **result.final_eval})
        with disk_full_as_user_error(f"the final adapter into {self.output_dir}", RESUME_HINT):
            self.save_final()
        write_run_report(self.output_dir)  # with the final evaluation
        result.steps = self.state.step
        return result

    def save_final(self) -> None:
        """The standard PEFT adapter folder, plus tokenizer and resolved recipe, each file renamed into place."""
        if not is_main_process():
            return
        staging = Path(tempfile.mkdtemp(dir=self.output_dir, prefix=f".{FINAL_STAGING}.{os.getpid()}.", suffix=".tmp"))
        self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        honour_umask(staging)
        move_files_into(staging, self.output_dir)
        write_text_atomic(
            self.output_dir / "train_summary.txt",
            f"pairs: {self.train_summary.kept}\n"
            f"dropped (prompt fills max_length): {len(self.train_summary.dropped_long_prompt)}\n"
            f"truncated completions: {self.train_summary.truncated}\n"
            f"steps: {self.state.step}\n",
        )


def train(
    recipe: Recipe, resume: bool = False, console: Console | None = None, trust_remote_code: bool = False
) -> TrainResult:
    """Run `recipe` while holding its output folder: a second run into the same folder refuses until this one ends.

    Remote code runs only with `trust_remote_code`, given by the caller (the command line); the recipe's
    model.trust_remote_code never grants it.
    """
    output_dir = check_output_dir(recipe)
    with claimed_folder(output_dir, "train", "--output-dir"):
        trainer = Trainer(recipe, console=console, resume=resume, trust_remote_code=trust_remote_code)
        try:
            return trainer.run()
        finally:
            trainer.metrics_log.close()  # finishes the trackers' runs, after Ctrl-C or divergence too
