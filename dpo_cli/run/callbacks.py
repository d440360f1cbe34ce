"""What a training run does around its steps, one small class each: `fit` (loop.py) calls them in list order.

`default_callbacks` is the list `dpo-cli train` runs with. Its order matters: periodic evaluation adds its metrics
to the step's record before the metrics log writes it; the checkpointer saves after the record is on disk, so
report.png and a resume see it; after the last step come the final evaluation and the last checkpoint (a signal may
end them, as during a step), then the outputs, which a signal does not cut short: the final metrics, the adapter,
report.png and the model card. Only the main process writes (run/distributed.py).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpo_cli.files import disk_full_as_user_error, move_files_into, write_text_atomic
from dpo_cli.model.reference_adapter import save_policy
from dpo_cli.output_folder import honour_umask
from dpo_cli.run import distributed, sharding
from dpo_cli.run.checkpoint import save_checkpoint, whole_state
from dpo_cli.run.distributed import is_main_process
from dpo_cli.run.model_card import write_model_card
from dpo_cli.run.report import write_run_report
from dpo_cli.run.setup import RESUME_HINT, Run

FINAL_STAGING = "final"
"""Staging folder of the final adapter files: `.final.{pid}.{random}.tmp` in the output folder."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    records: list[dict] = field(default_factory=list)
    final_eval: dict[str, float] | None = None


class Callback:
    """What a run does around its steps. Each hook does nothing unless a subclass says otherwise.

    `on_step_end` may add keys to `record` (periodic evaluation does), so the callbacks after it see them.
    `on_loop_end` and `on_end` run only after the last step; `close` always runs, whatever stopped the loop."""

    def on_loop_start(self, run: Run) -> None:
        pass

    def on_step_begin(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run, record: dict) -> None:
        pass

    def on_interrupt(self, run: Run) -> None:
        """Ctrl-C or SIGTERM during a step; `run.state` is still the last complete step."""

    def on_loop_end(self, run: Run, result: TrainResult) -> None:
        """After the last step, before any `on_end`: work a signal may still interrupt (the final evaluation, the
        last checkpoint); an interrupt here ends the run like one during a step."""

    def on_end(self, run: Run, result: TrainResult) -> None:
        """The run's last outputs: the final metrics, the adapter, the report, the model card. No signal interrupts
        them (interrupts.held): they are written, then the run ends with 130 if one came."""

    def close(self, run: Run) -> None:
        """Releases what the callback holds (a live display), after the loop ends or fails."""


def evaluate(run: Run) -> dict[str, float]:
    """The objective's metrics of the current adapter on the run's eval pairs, named `eval_*` (under torchrun each
    process scores its share, and the metrics are of all of them)."""
    metrics = run.objective.evaluate(
        run.model,
        distributed.my_share(run.eval_pairs),
        run.tokenizer.pad_token_id,
        run.recipe.training.eval_batch_size,
        run.layout,
        None if run.eval_ref_logps is None else distributed.my_share(run.eval_ref_logps),
        # Sharded, each forward is a collective: every process must score as many batches (sharding.eval_batches).
        min_batches=sharding.eval_batches(run.model, len(run.eval_pairs), run.recipe.training.eval_batch_size),
        filler=run.eval_pairs[0],
    )
    return {f"eval_{key}": value for key, value in metrics.items()}


class PeriodicEval(Callback):
    """Evaluates every `eval_steps` steps into the step's record, and once more after the last step
    (`result.final_eval`)."""

    def __init__(self, eval_steps: int):
        self.eval_steps = eval_steps

    def on_step_end(self, run: Run, record: dict) -> None:
        if run.eval_pairs and self.eval_steps and run.state.step % self.eval_steps == 0:
            record.update(evaluate(run))

    def on_loop_end(self, run: Run, result: TrainResult) -> None:
        # Here, not in on_end: an evaluation may take minutes, and a signal must still be able to end it.
        if run.eval_pairs:
            result.final_eval = evaluate(run)


class MetricsLogger(Callback):
    """Each step's record, then the final evaluation, into metrics.jsonl and the trackers (`run.metrics_log`)."""

    def on_step_end(self, run: Run, record: dict) -> None:
        self._write(run, record)

    def on_end(self, run: Run, result: TrainResult) -> None:
        if result.final_eval:
            self._write(run, {"step": run.state.step, **result.final_eval})

    def _write(self, run: Run, record: dict) -> None:
        with disk_full_as_user_error(f"{run.metrics_log.path} (step {record['step']})", RESUME_HINT):
            run.metrics_log.write(record)


class ProgressBar(Callback):
    """The terminal's bar: steps done, loss, accuracy and tokens/s of the last step, time left."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not is_main_process(),
        )
        self.task = None

    def on_loop_start(self, run: Run) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=run.total_steps, completed=run.state.step, loss="-", acc="-", tps="-"
        )

    def on_step_end(self, run: Run, record: dict) -> None:
        self.progress.update(
            self.task,
            completed=run.state.step,
            loss=f"{record['loss']:.4f}",
            acc=f"{record[run.objective.accuracy_key]:.2f}",
            tps=f"{record['tokens_per_second']:.0f}",
        )

    def on_interrupt(self, run: Run) -> None:
        self.progress.stop()  # before the checkpointer's save, so its messages do not tear the bar

    def close(self, run: Run) -> None:
        self.progress.stop()


class Checkpointer(Callback):
    """A checkpoint every `save_steps`, after the last step and on an interrupt; report.png redrawn with each."""

    def __init__(self, save_steps: int, keep: int):
        self.save_steps, self.keep = save_steps, keep
        self.last_saved: int | None = None

    def on_loop_start(self, run: Run) -> None:
        self.last_saved = run.state.step

    def on_step_end(self, run: Run, record: dict) -> None:
        if self.save_steps and run.state.step % self.save_steps == 0:
            self.save(run)

    def on_interrupt(self, run: Run) -> None:
        if run.state.step > self.last_saved:
            self.save(run)

    def on_loop_end(self, run: Run, result: TrainResult) -> None:
        if run.state.step > self.last_saved:
            # No report.png here: RunReport draws it moments later with the final evaluation (drawing is ~1 s).
            self.save(run, report=False)

    def save(self, run: Run, report: bool = True) -> None:
        whole = whole_state(run.model, run.optimizer)  # every process: a sharded run gathers its slices
        if is_main_process():
            with disk_full_as_user_error(f"the checkpoint of step {run.state.step}", RESUME_HINT):
                save_checkpoint(run.output_dir, run.model, run.optimizer, run.scheduler, run.state, self.keep, whole)
            if report:
                write_run_report(run.output_dir)  # report.png: the curves so far, at every checkpoint
        self.last_saved = run.state.step  # only once saved: an interrupt during the save saves again


class FinalAdapter(Callback):
    """The standard PEFT adapter folder, plus tokenizer and train_summary.txt, each file renamed into place."""

    def on_end(self, run: Run, result: TrainResult) -> None:
        # Sharded, every process gives its slice of the adapter; else PEFT reads it off the main process's model.
        adapter = sharding.full_adapter_state(run.model) if sharding.is_sharded(run.model) else None
        if not is_main_process():
            return
        with disk_full_as_user_error(f"the final adapter into {run.output_dir}", RESUME_HINT):
            self._save(run, adapter)

    def _save(self, run: Run, adapter: dict | None) -> None:
        staging = Path(tempfile.mkdtemp(dir=run.output_dir, prefix=f".{FINAL_STAGING}.{os.getpid()}.", suffix=".tmp"))
        save_policy(run.model, staging, state_dict=adapter)
        run.tokenizer.save_pretrained(staging)
        honour_umask(staging)
        move_files_into(staging, run.output_dir)
        summary = run.train_summary
        write_text_atomic(
            run.output_dir / "train_summary.txt",
            f"pairs: {summary.kept}\n"
            f"dropped (prompt fills max_length): {len(summary.dropped_long_prompt)}\n"
            f"truncated completions: {summary.truncated}\n"
            f"steps: {run.state.step}\n",
        )


class RunReport(Callback):
    """report.png once more at the end, with the final evaluation (the checkpointer draws it at checkpoints)."""

    def on_end(self, run: Run, result: TrainResult) -> None:
        if is_main_process():
            write_run_report(run.output_dir)


class ModelCard(Callback):
    """README.md, the model card, last: it quotes the final metrics and report.png, and `command` (what ran)."""

    def __init__(self, command: str | None):
        self.command = command

    def on_end(self, run: Run, result: TrainResult) -> None:
        if is_main_process():
            with disk_full_as_user_error(f"the model card in {run.output_dir}", RESUME_HINT):
                write_model_card(run.output_dir, command=self.command)


def default_callbacks(run: Run, console: Console, command: str | None = None) -> list[Callback]:
    """What `dpo-cli train` does around its steps, in the order that matters (see the module docstring)."""
    training = run.recipe.training
    return [
        PeriodicEval(training.eval_steps),
        MetricsLogger(),
        ProgressBar(console),
        Checkpointer(training.save_steps, training.save_total_limit),
        FinalAdapter(),
        RunReport(),
        ModelCard(command),
    ]
