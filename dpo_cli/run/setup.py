"""Everything a training run needs before its first step: `build_run(recipe) -> Run`.

The order is the run's safety: the output folder is checked and (on `--resume`) the saved settings compared before
any model is loaded, so a refused run fails in seconds; the data is tokenized before the model, for the same reason.
`fit` (loop.py) then only steps. The data is read as one stream of micro-batches over epochs, each epoch in its own
seeded order; an optimizer step consumes the next grad_accum * world_size micro-batches (each of torchrun's processes
takes every world_size-th one, run/distributed.py). That single number (micro-batches done) is the whole data
position, the same for any number of processes, which is what makes `--resume` replay exactly what an uninterrupted
run would have done, and lets a resumed run use another number of processes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dpo_cli.config import Recipe, reference_adapter_of
from dpo_cli.data.split import training_requests
from dpo_cli.data.templates import template_file
from dpo_cli.dpo.layouts import SFT_LAYOUTS, token_budget_batches
from dpo_cli.dpo.scoring import ScoringModel, direct_logps
from dpo_cli.errors import UserError
from dpo_cli.files import disk_full_as_user_error, remove_stale_temporaries
from dpo_cli.model.attention_support import resolve_layout
from dpo_cli.model.load import (
    IGNORED_RECIPE_TRUST,
    add_lora,
    compile_decoder_layers,
    load_base_model,
    load_tokenizer,
    resolve_device,
    scoring_model,
    trainable_parameters,
)
from dpo_cli.model.reference_adapter import add_reference_adapter, check_start_adapter, start_from_adapter
from dpo_cli.output_folder import check_folder_is_ours, check_placeable, is_within
from dpo_cli.run import distributed, interrupts, sharding
from dpo_cli.run.checkpoint import (
    SavedCheckpoint,
    TrainerState,
    apply_schedule,
    latest_checkpoint,
    read_checkpoint,
    remove_stale_checkpoint_temporaries,
    restore_checkpoint,
)
from dpo_cli.run.data_report import load_split
from dpo_cli.run.distributed import is_main_process
from dpo_cli.run.metrics import MetricsLog
from dpo_cli.run.objective import Objective, objective_for
from dpo_cli.run.reference import precompute_reference_logps, training_reference_logps, training_splits
from dpo_cli.run.resume_settings import (
    TRAIN_PAIRS,
    WORLD_SIZE,
    changeable_settings,
    changed_settings,
    fixed_settings,
    refuse_changed_fixed_settings,
)
from dpo_cli.run.trackers import Trackers

METRICS_FILE = "metrics.jsonl"
OUR_TEMPORARIES = (
    r"final|metrics\.jsonl|recipe\.yaml|train_summary\.txt|skipped-\w+\.jsonl|README\.md|report\.png|reference-adapter"
)
"""What a killed run may leave as `.NAME.{pid}.{random}.tmp` in its output folder (see files.py)."""
RESUME_HINT = "rerun with --resume"


@dataclass
class DataStream:
    """Micro-batch m of the endless stream is micro-batch (m mod per_epoch) of epoch (m div per_epoch).

    Each epoch shuffles the pairs into `batch_size` slices, or, with `budget_batches` (--max-tokens-per-batch),
    shuffles the order of those fixed micro-batches."""

    num_pairs: int
    batch_size: int
    seed: int
    budget_batches: list[list[int]] | None = None
    _order: tuple[int, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def per_epoch(self) -> int:
        if self.budget_batches is not None:
            return len(self.budget_batches)
        return math.ceil(self.num_pairs / self.batch_size)

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        order = self._epoch_order(epoch)
        if self.budget_batches is not None:
            return list(self.budget_batches[int(order[position])])
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's seeded permutation (of pairs, or of budget batches), kept for the next micro-batches: each
        step asks for several, and a permutation of a large data set is not free."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (
                epoch,
                torch.randperm(
                    self.per_epoch if self.budget_batches is not None else self.num_pairs, generator=generator
                ),
            )
        return self._order[1]


@dataclass
class Run:
    """One training run, set up and ready to step: what `fit` and its callbacks read and advance."""

    recipe: Recipe
    output_dir: Path
    device: torch.device
    tokenizer: Any
    train_pairs: Any  # the tokenized train split (a datasets.Dataset)
    train_summary: Any  # what tokenizing kept, dropped and truncated
    eval_pairs: Any | None
    model: Any  # the base with its LoRA adapter, in train mode
    scoring: ScoringModel  # what dpo/scoring calls of `model`: backbone, head, reference mode
    layout: str
    train_ref_logps: torch.Tensor | None  # (num_pairs, 2) read or precomputed (reference.py): steps skip the reference
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: DataStream  # replaceable by anything with `per_epoch` and `indices(m)` (the bench reads in order)
    total_steps: int
    state: TrainerState
    metrics_log: MetricsLog  # metrics.jsonl and the trackers; opened here because a resume truncates it
    resumed_from: Path | None = None
    eval_ref_logps: torch.Tensor | None = None  # (num_eval_pairs, 2), as train_ref_logps, for the eval steps
    data_parallel: Any | None = None  # under torchrun: the DDP module `scoring.policy` runs, or the FSDP root
    objective: Objective | None = None  # what the steps train (run/objective.py); None: DPO
    example_weights: list[int] | None = None  # each train example's weight in a step's mean loss; None: one each

    def __post_init__(self):
        if self.objective is None:
            self.objective = objective_for(self.recipe)


def total_steps(recipe: Recipe, stream: DataStream, resumed: TrainerState | None = None) -> int:
    """max_steps, or the steps to read `epochs` epochs: those a resumed run did, then steps of this run's size."""
    training = recipe.training
    if training.max_steps:
        return training.max_steps
    per_step = training.grad_accum * distributed.world_size()
    done_steps, done_micro_batches = (resumed.step, resumed.micro_batches_done) if resumed else (0, 0)
    left = training.epochs * stream.per_epoch - done_micro_batches
    return max(1, done_steps + math.ceil(left / per_step))


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
    for path in (*recipe.data.train, *recipe.data.eval, template_file(recipe.data.chat_template)):
        if path and is_within(path, output_dir):
            raise UserError(f"--output-dir {output_dir}: holds the input file {path}; pick a folder of its own")
    reference = reference_adapter_of(recipe.model)
    adapters = (("--from-adapter", recipe.model.from_adapter), ("--reference-adapter", reference))
    for flag, adapter in adapters:
        if adapter and (is_within(adapter, output_dir) or is_within(output_dir, adapter)):
            raise UserError(f"--output-dir {output_dir}: is or holds {flag} {adapter}; pick a folder of its own")
    check_folder_is_ours(output_dir, "train", "--output-dir", " or an earlier train run's; pick another --output-dir")
    return output_dir


def _checkpoint_to_resume(output_dir: Path, resume: bool) -> Path | None:
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


def _remove_stale_temporaries(output_dir: Path) -> None:
    """What saves killed in an earlier run left (a lock on the folder must be held before this)."""
    if is_main_process():
        remove_stale_checkpoint_temporaries(output_dir)
        remove_stale_temporaries(output_dir, OUR_TEMPORARIES)


def _load_data(recipe: Recipe, tokenizer, output_dir: Path, console: Console, kind: str):
    """(train pairs, what tokenizing kept and dropped, eval pairs or None, their report or None)."""
    train_request, eval_request = training_requests(recipe.data, output_dir, kind)
    train_pairs, summary = load_split(tokenizer, train_request, console)
    eval_pairs = eval_summary = None
    if eval_request is not None:
        eval_pairs, eval_summary = load_split(tokenizer, eval_request, console)
    return train_pairs, summary, eval_pairs, eval_summary


def _optimizer_and_schedule(recipe: Recipe, model, total: int):
    """AdamW over the adapter and its schedule, plus the multiplier function a resume re-applies."""
    training = recipe.training
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=training.lr, weight_decay=training.weight_decay)
    warmup = int(training.warmup_ratio * total)

    def multiplier(step: int) -> float:
        return lr_lambda(step, total, warmup, training.scheduler)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier), multiplier


def _resume_state(run: Run, checkpoint: SavedCheckpoint, multiplier, console: Console) -> None:
    """Puts `checkpoint` into the run: adapter, optimizer, schedule, position; the metrics log is cut back to it."""
    saved = restore_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler)
    training = run.recipe.training
    apply_schedule(run.optimizer, run.scheduler, training.lr, training.weight_decay, multiplier)
    run.state.step, run.state.micro_batches_done = saved.step, saved.micro_batches_done
    run.state.num_tokens = saved.num_tokens
    with disk_full_as_user_error(f"{run.metrics_log.path}", RESUME_HINT):
        run.metrics_log.truncate_after(run.state.step)
    console.print(f"resuming from {checkpoint.path} (step {run.state.step})")
    changes = changed_settings(saved.changeable_settings, run.state.changeable_settings)
    if changes:
        console.print(f"resuming with changed settings, applied from step {saved.step + 1}: " + ", ".join(changes))


def _checked_folder_and_settings(recipe: Recipe, resume: bool, console: Console):
    """(checkpoint to resume, read and checked, or None; the run's fixed settings; trackers): every refusal that
    needs no model."""
    output_dir = Path(recipe.training.output_dir)
    checkpoint = _checkpoint_to_resume(output_dir, resume)
    trackers = Trackers(output_dir, recipe.report, recipe.to_dict())  # a missing package fails here
    if resume and checkpoint is None:
        console.print(f"no checkpoint in {output_dir}; starting from the beginning")
    _remove_stale_temporaries(output_dir)
    settings = fixed_settings(recipe)
    if checkpoint is None:
        return None, settings, trackers
    files = read_checkpoint(checkpoint)  # before any model loads: a damaged file or changed setting fails in seconds
    refuse_changed_fixed_settings(checkpoint, files.state.fixed_settings, settings)
    return files, settings, trackers


def _model_and_layout(recipe: Recipe, device, trust_remote_code: bool, console: Console, asked_layout: str):
    load = sharding.load_base if recipe.training.sharding == "fsdp" else load_base_model  # whole in rank 0 only
    model = add_lora(
        load(recipe.model, device, trust_remote_code),
        recipe.lora,
        recipe.model.gradient_checkpointing,
    )
    named = reference_adapter_of(recipe.model)
    reference = Path(named) if named else None
    if recipe.model.from_adapter:  # the policy starts as that adapter; the reference is by default the same one
        start_from_adapter(model, Path(recipe.model.from_adapter), recipe.model.path, reference)
    elif reference:  # a fresh policy (the base) against an adapter's reference
        add_reference_adapter(model, reference, base_path=recipe.model.path)
    model.train()
    if recipe.model.compile:
        console.print(f"compiling {compile_decoder_layers(model)} decoder layers (torch.compile, on the first steps)")
    layout, fallback_note = resolve_layout(asked_layout, model, recipe.data.max_length)
    if fallback_note:
        console.print(fallback_note)
    return model, layout


def _layout_asked(recipe: Recipe, objective: Objective) -> str:
    """The layout to resolve: SFT has no shared prompt to lay once, so its `auto` is `packed` (padded where the
    model cannot take the packed mask, as resolve_layout decides)."""
    layout = recipe.data.layout
    if objective.name != "sft":
        return layout
    if layout == "auto":
        return "packed"
    if layout not in SFT_LAYOUTS:
        raise UserError(f"--layout {layout}: sft lays out one sequence per example; use {', '.join(SFT_LAYOUTS)}")
    return layout


def _reference_share_scorer(recipe: Recipe, model, layout: str, pad_token_id: int, splits, console: Console):
    """`score_share(name)` for sharding.led_by_main_process: this process's share (distributed.my_share) of a
    split's reference log-probs on the sharded model, in as many batches as every other process's (a filler pair
    scored and dropped where its share is smaller)."""
    named = training_splits(recipe, layout, pad_token_id, *splits)

    def score_share(name: str) -> torch.Tensor:
        split = named[name]
        batches = sharding.eval_batches(model, len(split.pairs), split.batch_size)
        share = distributed.my_share(split.pairs)
        dpo, batch_size = recipe.dpo, split.batch_size
        return precompute_reference_logps(
            model, share, pad_token_id, dpo, batch_size, console, layout, min_batches=batches, filler=split.pairs[0]
        )

    return score_share


def run_device(recipe: Recipe) -> torch.device:
    """The device this process trains on: the recipe's, or under torchrun on CUDA this process's own GPU."""
    return distributed.device_for(resolve_device(recipe.model.device))


def build_run(
    recipe: Recipe, *, resume: bool = False, trust_remote_code: bool = False, console: Console | None = None
) -> Run:
    """The run `recipe` describes, ready for `fit`: refusals first, then data, model, optimizer, schedule, resume.

    The caller holds the output folder (`claimed_folder`). Remote code runs only with `trust_remote_code`, given by
    the caller (the command line); the recipe's model.trust_remote_code never grants it. `console` shows progress.
    """
    console = console or Console()
    device = run_device(recipe)
    distributed.start(device)  # first: every later refusal then ends a rank its peers see fail at once
    sharding.check_sharding(recipe.training.sharding, recipe.model.quantize)
    if recipe.model.trust_remote_code and not trust_remote_code:
        console.print(f"[yellow]{IGNORED_RECIPE_TRUST}[/yellow]")
    recipe.model.trust_remote_code = trust_remote_code  # the saved recipe records what this command granted
    output_dir = Path(recipe.training.output_dir)
    if recipe.model.from_adapter:  # before the resume check hashes it, and before any model loads
        check_start_adapter(Path(recipe.model.from_adapter), recipe.lora, recipe.model.path)
    reference = reference_adapter_of(recipe.model)
    if reference and reference != recipe.model.from_adapter:
        check_start_adapter(Path(reference), recipe.lora, recipe.model.path, "--reference-adapter")
    resumed, settings, trackers = _checked_folder_and_settings(recipe, resume, console)
    saved = None if resumed is None else resumed.state
    objective = objective_for(recipe)
    asked_layout = _layout_asked(recipe, objective)
    _set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model.path, trust_remote_code)
    with distributed.main_process_first():  # rank 0 prepares the data cache, the others then read it
        loaded = _load_data(recipe, tokenizer, output_dir, console, objective.data_kind)
        train_pairs, summary, eval_pairs, eval_summary = loaded
    settings[TRAIN_PAIRS] = len(train_pairs)
    if saved is not None:  # the same files can still give other pairs (a changed tokenizer)
        refuse_changed_fixed_settings(resumed.path, saved.fixed_settings, {TRAIN_PAIRS: settings[TRAIN_PAIRS]})
    model, layout = _model_and_layout(recipe, device, trust_remote_code, console, asked_layout)
    training = recipe.training
    budget = training.max_tokens_per_batch
    budget_batches = token_budget_batches(objective.tokens_per_example(train_pairs), budget) if budget else None
    stream = DataStream(len(train_pairs), training.batch_size, training.seed, budget_batches)
    total = total_steps(recipe, stream, saved)
    evaluation = None if eval_pairs is None else (eval_pairs, eval_summary)
    visits_every_pair = total * training.grad_accum * distributed.world_size() >= stream.per_epoch
    # Rank 0 reads or builds the cache entries; the others then find them built and read them (or, when it keeps the
    # values in memory only, as with an unwritable cache, compute their own, which equal rank 0's). Under fsdp no
    # process holds the whole model on its device: the reference is scored after sharding, every process a share.
    ref_logps = eval_ref_logps = None
    splits = (train_pairs, summary), evaluation

    def reference_logps(score=None):
        return training_reference_logps(
            recipe, model, layout, tokenizer.pad_token_id, *splits, visits_every_pair, console, score
        )

    sharded = None
    if recipe.training.sharding == "fsdp":  # sharded before the reference and AdamW (the parameters are new)
        sharded = sharding.shard(model, device)
        if objective.uses_reference:
            score_share = _reference_share_scorer(recipe, model, layout, tokenizer.pad_token_id, splits, console)
            ref_logps, eval_ref_logps = sharding.led_by_main_process(
                lambda score: reference_logps(lambda split: score(split.name, len(split.pairs))), score_share, device
            )
    elif objective.uses_reference:
        with distributed.main_process_first():
            ref_logps, eval_ref_logps = reference_logps()
    optimizer, scheduler, multiplier = _optimizer_and_schedule(recipe, model, total)
    state = TrainerState(
        step=0,
        micro_batches_done=0,
        total_steps=total,
        fixed_settings=settings,
        changeable_settings={**changeable_settings(recipe), WORLD_SIZE: distributed.world_size()},
    )
    run = Run(
        recipe, output_dir, device, tokenizer, train_pairs, summary, eval_pairs, model, scoring_model(model), layout,
        ref_logps,
        optimizer, scheduler, stream, total, state, MetricsLog(output_dir / METRICS_FILE, trackers),
        None if resumed is None else resumed.path,
        eval_ref_logps, objective=objective, example_weights=objective.example_weights(train_pairs),
    )  # fmt: skip
    if resumed is not None:
        _resume_state(run, resumed, multiplier, console)
    elif resume:  # a run that died before its first checkpoint: its metric lines would repeat steps
        with disk_full_as_user_error(f"{run.metrics_log.path}", RESUME_HINT):
            run.metrics_log.truncate_after(0)
    if sharded is not None:
        run.data_parallel = sharded
    elif distributed.is_distributed():
        run.data_parallel = distributed.wrap_policy(model, partial(direct_logps, run.scoring), device)
        run.scoring = replace(run.scoring, policy=run.data_parallel)
    n_params = sum(p.numel() for p in trainable_parameters(model))
    console.print(f"trainable LoRA parameters: {n_params:,}; {total} optimizer steps on {device}")
    console.print(global_batch(recipe))
    interrupts.raise_if_received()  # an interrupt a library swallowed while loading
    return run


def global_batch(recipe: Recipe) -> str:
    """What one optimizer step averages over: batch (or token budget) x grad_accum x processes."""
    training, processes = recipe.training, distributed.world_size()
    micro_batches = training.grad_accum * processes
    unit = "examples" if training.objective == "sft" else "pairs"
    per_micro = (
        f"up to {training.max_tokens_per_batch} tokens"
        if training.max_tokens_per_batch
        else f"{training.batch_size} {unit}"
    )
    total = "" if training.max_tokens_per_batch else f" = {training.batch_size * micro_batches} {unit}"
    return (
        f"global batch: {per_micro} x grad_accum {training.grad_accum} x {processes} process"
        f"{'es' if processes > 1 else ''}{total} per optimizer step"
    )
