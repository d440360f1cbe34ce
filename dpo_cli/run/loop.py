"""The training loop: `fit(run, callbacks)` steps a `Run` (setup.py) to its last step; `train` is the command's run.

`train_step` is one optimizer step, and the only place the model is trained. Everything else a run does around the
steps (the progress bar, metrics.jsonl and the trackers, periodic evaluation, checkpoints, report.png, the final
adapter) is a callback (callbacks.py), called in list order; `train` writes recipe.yaml before the first step. A
callback stops the run by raising: `UserError` for something a person must fix, `KeyboardInterrupt` for an interrupt.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from rich.console import Console

from dpo_cli.config import RECIPE_FILENAME, Recipe, reference_adapter_of
from dpo_cli.errors import UserError
from dpo_cli.files import disk_full_as_user_error
from dpo_cli.model.load import trainable_parameters
from dpo_cli.model.reference_adapter import REFERENCE_COPY, save_reference_copy
from dpo_cli.output_folder import claimed_folder
from dpo_cli.run import distributed, interrupts, sharding
from dpo_cli.run.callbacks import Callback, TrainResult, default_callbacks
from dpo_cli.run.metrics import is_finite
from dpo_cli.run.setup import Run, build_run, check_output_dir, run_device


class TrainingDiverged(UserError):
    exit_code = 3


class TrainingInterrupted(UserError):
    exit_code = 130


def _divergence_hint(recipe: Recipe) -> str:
    beta = "" if recipe.training.objective == "sft" else f" or --beta (now {recipe.dpo.beta:g})"
    return (
        f"training stopped, the last good checkpoint is kept. Lower --lr (now {recipe.training.lr:g}){beta}, "
        "or check the data"
    )


def step_batches(run: Run) -> list[list[int]]:
    """The pair indices of each of this process's micro-batches of the run's next optimizer step."""
    positions = distributed.my_micro_batches(run.state.micro_batches_done, run.recipe.training.grad_accum)
    return [run.stream.indices(m) for m in positions]


def _weight_of_step(run: Run, batches: list[list[int]]) -> int:
    """What the whole step weighs, every process's examples: its pairs (DPO), or its trained tokens (SFT,
    `run.example_weights`). Each unit weighs the same in the averaged gradient."""
    if distributed.is_distributed():
        first, step_size = run.state.micro_batches_done, run.recipe.training.grad_accum * distributed.world_size()
        batches = [run.stream.indices(m) for m in range(first, first + step_size)]
    if run.example_weights is None:
        return sum(len(b) for b in batches)
    return sum(run.example_weights[i] for b in batches for i in b)


def _ref_logps(run: Run, indices: list[int]) -> torch.Tensor | None:
    """(P, 2) the precomputed reference log-probs of these pairs, or None: score_batch runs the reference."""
    return None if run.train_ref_logps is None else run.train_ref_logps[indices]


def _gradient_sync(run: Run, last: bool):
    """DDP all-reduces (FSDP reduce-scatters) the gradients once per step, in the backward of this process's last
    micro-batch: summed in the same order as one process sums them."""
    if run.data_parallel is None or last:
        return contextlib.nullcontext()
    return sharding.gradient_sync_paused(run.data_parallel)


def _backward_micro_batches(run: Run, batches: list[list[int]]):
    """Accumulates the gradient of the step's mean loss over its pairs (or trained tokens); (the objective's
    metrics, the real tokens)."""
    objective = run.objective
    weight_of_step = max(_weight_of_step(run, batches), 1)  # a step of nothing to train on has a zero gradient
    processes = distributed.world_size()
    metrics, tokens = objective.metrics(), 0
    for number, indices in enumerate(batches, start=1):
        examples = [run.train_pairs[i] for i in indices]
        batch = objective.collate(run.layout, examples, run.tokenizer.pad_token_id).to(run.device)
        with _gradient_sync(run, last=number == len(batches)):
            scores = objective.score(run.scoring, batch, _ref_logps(run, indices))
            # Summed over processes, so a NaN on one of them stops them all at this micro-batch.
            (loss_sum,) = distributed.sum_over_ranks([float(scores.loss_sum.detach())])
            if not is_finite(loss_sum):
                raise TrainingDiverged(
                    f"step {run.state.step + 1}: the loss is {loss_sum}; {_divergence_hint(run.recipe)}"
                )
            # Each pair (token) weighs the same in the step's gradient, however they are split into micro-batches
            # and processes; DDP averages over the processes, hence the factor.
            (scores.loss_sum * processes / weight_of_step).backward()
        metrics.add(scores)
        tokens += batch.num_tokens
    return metrics, tokens


def _update(run: Run) -> float:
    """Clips and applies the accumulated gradient; the gradient norm. Refuses a non-finite gradient or weight."""
    params = trainable_parameters(run.model)
    grad_norm = sharding.full_tensor(torch.nn.utils.clip_grad_norm_(params, run.recipe.training.max_grad_norm))
    if not is_finite(grad_norm):  # clipping cannot rescue it: inf * 0 is nan, and the update would be nan
        raise TrainingDiverged(
            f"step {run.state.step + 1}: the gradient norm is {float(grad_norm)}, so the step was not taken; "
            + _divergence_hint(run.recipe)
        )
    run.optimizer.step()
    if not _all_finite(params):  # checked here, so no checkpoint is ever non-finite
        raise TrainingDiverged(
            f"step {run.state.step + 1}: the adapter weights became non-finite after the update; "
            + _divergence_hint(run.recipe)
        )
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def _all_finite(params: list[torch.nn.Parameter]) -> bool:
    """Every weight of every process finite (sharded, each process checks its slice and the counts are summed)."""
    local = all(bool(torch.isfinite(sharding.local_part(p)).all()) for p in params)
    if not sharding.is_sharded_parameter(params[0]):
        return local
    (bad,) = distributed.sum_over_ranks([0.0 if local else 1.0])
    return bad == 0


def train_step(run: Run, batches: list[list[int]] | None = None) -> dict:
    """One optimizer step over `batches` (micro-batches of pair indices; default: the stream's next ones).

    Advances `run.state` and returns the step's record, as metrics.jsonl holds it."""
    started = time.perf_counter()
    batches = step_batches(run) if batches is None else batches
    metrics, tokens = _backward_micro_batches(run, batches)
    learning_rate = run.scheduler.get_last_lr()[0]
    grad_norm = _update(run)
    (tokens,) = distributed.sum_over_ranks([tokens])
    tokens = int(tokens)
    run.state.step += 1
    run.state.micro_batches_done += len(batches) * distributed.world_size()
    run.state.num_tokens += tokens
    elapsed = time.perf_counter() - started
    return {
        "step": run.state.step,
        "epoch": round(run.state.micro_batches_done / run.stream.per_epoch, 4),
        **metrics.means(),
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
        "tokens_per_second": tokens / elapsed,
        "num_tokens": run.state.num_tokens,
    }


def fit(run: Run, callbacks: list[Callback]) -> TrainResult:
    """Steps `run` to its last step, calling `callbacks` around each step and at the end, in list order."""
    result = TrainResult(run.output_dir, run.state.step)
    try:
        for callback in callbacks:
            callback.on_loop_start(run)
        # DDP's all-reduce runs inside backward; a sharded run stops on an interrupt between steps (_interrupted)
        sharded = sharding.is_sharded(run.model)
        with distributed.peer_failures_as_user_error(), interrupts.deferred() if sharded else contextlib.nullcontext():
            _steps(run, callbacks, result)
        for callback in callbacks:
            callback.on_loop_end(run, result)
    except KeyboardInterrupt:
        for callback in callbacks:
            callback.on_interrupt(run)
        raise TrainingInterrupted(
            f"interrupted at step {run.state.step} by {interrupts.received() or 'SIGINT'}; checkpoint saved in "
            f"{run.output_dir}, continue with the same command and --resume"
        ) from None
    finally:
        for callback in callbacks:
            callback.close(run)
    with interrupts.held():  # the last outputs are written whole, whatever signal comes (a second one included)
        for callback in callbacks:
            callback.on_end(run, result)
    if interrupts.received():
        raise TrainingInterrupted(
            f"interrupted by {interrupts.received()} after the last step ({run.state.step}); the final outputs were "
            f"written first, so the run in {run.output_dir} is complete"
        )
    distributed.barrier()  # the other processes end once the main one has written the final outputs
    distributed.ended_together()
    result.steps = run.state.step
    return result


def _steps(run: Run, callbacks: list[Callback], result: TrainResult) -> None:
    while run.state.step < run.total_steps:
        if _interrupted(run):
            raise KeyboardInterrupt
        for callback in callbacks:
            callback.on_step_begin(run)
        record = train_step(run)
        for callback in callbacks:
            callback.on_step_end(run, record)
        result.records.append(record)


def _interrupted(run: Run) -> bool:
    """A signal arrived (and a library may have swallowed its KeyboardInterrupt). Sharded, where signals are
    deferred, it is asked of every process, so all of them stop before the same step."""
    if not sharding.is_sharded(run.model):
        return interrupts.received() is not None
    (count,) = distributed.sum_over_ranks([0.0 if interrupts.received() is None else 1.0])
    return count > 0


def train(
    recipe: Recipe,
    resume: bool = False,
    console: Console | None = None,
    trust_remote_code: bool = False,
    command: str | None = None,
) -> TrainResult:
    """Run `recipe` while holding its output folder: a second run into the same folder refuses until this one ends.
    Every output, the model card (which quotes `command`, the command line that ran) included, is written while the
    folder is held.

    Remote code runs only with `trust_remote_code`, given by the caller (the command line); the recipe's
    model.trust_remote_code never grants it.
    """
    main = distributed.is_main_process()
    console = (console or Console()) if main else Console(quiet=True)  # one process speaks; each prints its error
    distributed.start(run_device(recipe))  # first: a refusal below then ends a process its peers see fail at once
    # Under torchrun the main process checks and holds the folder for the job; the others write nothing there, and
    # wait until it holds it (so none of them sees the folder half-claimed).
    output_dir = check_output_dir(recipe) if main else Path(recipe.training.output_dir)
    claim = claimed_folder(output_dir, "train", "--output-dir") if main else contextlib.nullcontext()
    with claim:
        distributed.barrier()
        run = build_run(recipe, resume=resume, trust_remote_code=trust_remote_code, console=console)
        try:
            if main:
                run.output_dir.mkdir(parents=True, exist_ok=True)
                with disk_full_as_user_error(str(run.output_dir / RECIPE_FILENAME), "rerun"):
                    recipe.save(run.output_dir / RECIPE_FILENAME)
                reference = reference_adapter_of(recipe.model)
                if reference:  # eval and the model card find the reference here, wherever the folder goes
                    with disk_full_as_user_error(str(run.output_dir / REFERENCE_COPY), "rerun"):
                        save_reference_copy(Path(reference), run.output_dir)
            return fit(run, default_callbacks(run, console, command))
        finally:
            run.metrics_log.close()  # finishes the trackers' runs, after Ctrl-C or divergence too
