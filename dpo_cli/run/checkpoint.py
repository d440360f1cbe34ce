"""Resumable checkpoints: adapter, optimizer, scheduler, RNG states, the position in the data, and what they fit.

A checkpoint folder is built under a temporary name, fsynced and renamed into place when complete, so a run killed
while saving leaves the previous checkpoint intact and never a half-written one; the next start removes what the
killed save left. Resuming from step N replays exactly the batches an uninterrupted run would have seen after step N.

Nothing here is unpickled: the `.pt` files are read with `torch.load(weights_only=True)`, which accepts tensors,
numbers, strings and containers of them and refuses any other object, so a tampered file in a shared run folder
cannot run code on `--resume`.

`trainer_state.json` also records the settings the saved state depends on (`resume_check`): the model, the LoRA
shape, the data's content and everything that decides the order and grouping of batches or the loss cannot change
on resume, and a run that changes one is refused in one line before any model is loaded; the schedule and cadence
(`training.lr`, `max_steps`, ...) can, and the resumed run applies the new values.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import random
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory, remove_folder, remove_stale_temporaries, write_bytes
from dpo_cli.model.adapter import check_adapter_weights
from dpo_cli.model.reference_adapter import save_policy
from dpo_cli.output_folder import honour_umask
from dpo_cli.run import sharding
from dpo_cli.run.distributed import is_main_process

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_NAMES = r"step-\d+"


@dataclass
class TrainerState:
    step: int
    """Optimizer steps completed."""
    micro_batches_done: int
    """Micro-batches consumed from the (epoch-concatenated) data stream: where to continue."""
    total_steps: int
    num_tokens: int = 0
    fixed_settings: dict = field(default_factory=dict)
    """Recipe keys this state only fits with the same value (model, LoRA, data content, batching, loss)."""
    changeable_settings: dict = field(default_factory=dict)
    """Recipe keys a resumed run may change (schedule, cadence): kept to say what changed."""


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def remove_stale_checkpoint_temporaries(output_dir: Path) -> list[Path]:
    """The `.step-*.tmp` folders of saves that were killed (see files.remove_stale_temporaries)."""
    return remove_stale_temporaries(Path(output_dir) / CHECKPOINTS_DIR, _STEP_NAMES)


def _tensors_file_bytes(value) -> bytes:
    # Serialized in memory and written by us, so a full disk is an OSError (torch's own writer reports it as an
    # opaque RuntimeError).
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@dataclass
class WholeState:
    """What a checkpoint keeps of the adapter and its optimizer, whole (not one process's slice), so that a run with
    any number of processes and either sharding resumes it."""

    optimizer: dict
    """The optimizer state keyed by parameter name (torch.distributed.checkpoint's full optimizer state dict)."""
    adapter: dict | None = None
    """The LoRA weights keyed by parameter name, gathered from a sharded model; None: PEFT reads them off the model."""


def whole_state(model, optimizer) -> WholeState | None:
    """The adapter and optimizer state a checkpoint saves, for the main process (None in the others). Every process
    calls it: a sharded run gathers the slices here."""
    if sharding.is_sharded(model):
        adapter = sharding.full_adapter_state(model)
        optimizer_state = sharding.full_optimizer_state(model, optimizer)
        return WholeState(optimizer_state, adapter) if is_main_process() else None
    return WholeState(sharding.full_optimizer_state(model, optimizer)) if is_main_process() else None


def save_checkpoint(
    output_dir: Path, model, optimizer, scheduler, state: TrainerState, keep: int, whole: WholeState | None = None
) -> Path:
    """Writes checkpoint `state.step` (the main process alone). `whole`: `whole_state`'s result, which every process
    of a sharded run must gather beforehand; None: taken here, from a model that is not sharded."""
    whole = whole or whole_state(model, optimizer)
    target = Path(output_dir) / CHECKPOINTS_DIR / f"step-{state.step:06d}"
    with atomic_directory(target, replace=True, owner_in_name=True) as tmp:
        save_policy(model, tmp, state_dict=whole.adapter)  # a plain PEFT adapter folder either way
        honour_umask(tmp)  # safetensors writes its file 0600; a checkpoint reads like the rest of the run
        write_bytes(tmp / "optimizer.pt", _tensors_file_bytes(whole.optimizer))
        write_bytes(tmp / "scheduler.pt", _tensors_file_bytes(scheduler.state_dict()))
        write_bytes(tmp / "rng.pt", _tensors_file_bytes(_rng_states()))
        write_bytes(tmp / STATE_FILE, json.dumps(asdict(state), indent=2).encode())
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        remove_folder(old)
    return target


def _unreadable(path: Path, why: str) -> UserError:
    return UserError(
        f"{path}: checkpoint file is unreadable ({why}); delete {path.parent} to resume from the previous "
        "checkpoint, or start a new run in another --output-dir"
    )


def refuse_links_and_special_files(path: Path) -> None:
    """One line for a symlink, or anything but a plain file, in checkpoint folder `path` (or `path` itself a link).

    dpo-cli writes neither, and a link would have `--resume` read whatever it points at (`/etc/passwd`, another run's
    file); a pipe named like a checkpoint file would wait forever when opened."""
    path = Path(path)
    if path.is_symlink():
        raise _linked(path)
    for entry in sorted(path.iterdir()) if path.is_dir() else []:
        if entry.is_symlink():
            raise _linked(entry)
        if not entry.is_file():
            raise _unreadable(entry, "not a regular file; a checkpoint folder holds files only")


def _linked(path: Path) -> UserError:
    return UserError(
        f"{path}: is a symbolic link, which dpo-cli never writes into a checkpoint; replace it by the file itself, "
        f"or delete {path.parent if path.parent.name != CHECKPOINTS_DIR else path} to resume from the previous "
        "checkpoint"
    )


def read_state(path: Path) -> TrainerState:
    """The trainer_state.json of checkpoint folder `path`, or one line saying it cannot be used."""
    refuse_links_and_special_files(path)
    file = Path(path) / STATE_FILE
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(TrainerState)}
        state = TrainerState(**{key: value for key, value in values.items() if key in known})
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as error:
        raise _unreadable(file, error.__class__.__name__) from None
    for name in ("step", "micro_batches_done", "total_steps", "num_tokens"):
        value = getattr(state, name)
        if type(value) is not int or value < 0:  # bool is an int to isinstance; JSON true is no count
            raise _unreadable(file, f"{name} is {str(value)[:40]!r}, not a count")
    for name in ("fixed_settings", "changeable_settings"):
        if not isinstance(getattr(state, name), dict):
            raise _unreadable(file, f"{name} is not a mapping")
    return state


def _load_tensors_file(file: Path):
    """A `.pt` file as torch.save wrote it (a zip archive), loaded without unpickling anything but tensors and
    plain values; one line for anything else: text, an empty or truncated file, another format, pickled objects."""
    try:
        with file.open("rb") as handle:
            if not zipfile.is_zipfile(handle):  # what torch.save writes; torch's legacy reader fails in many ways
                raise _unreadable(file, "not a torch file: cut short, empty, or something else saved under its name")
            handle.seek(0)
            return torch.load(handle, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise _unreadable(file, "it holds objects other than tensors and numbers, which are never loaded") from None
    except UserError:
        raise
    except Exception as error:  # a damaged archive fails inside torch in many ways; none is a bug of ours
        raise _unreadable(file, error.__class__.__name__) from None


def _load_adapter(file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as error:
        raise _unreadable(file, error.__class__.__name__) from None
    return tensors  # load_checkpoint then checks its layout and that every value is finite (check_adapter_weights)


def _restore_adapter(model, adapter: dict, file: Path) -> None:
    """Every trainable (LoRA) weight of `model` from `adapter`: one missing, extra or of another shape is one line."""
    from peft import set_peft_model_state_dict

    if sharding.is_sharded(model):  # each process takes its slice of the whole weights
        unexpected = sharding.load_peft_adapter_state(model, adapter)
        if unexpected:
            raise UserError(f"{file}: checkpoint adapter does not fit this model/recipe (e.g. {unexpected[0]})")
        return
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as error:  # torch's size mismatch
        raise UserError(f"{file}: checkpoint adapter does not fit this model/recipe ({_first_line(error)})") from None
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{file}: checkpoint adapter does not fit this model/recipe (e.g. {result.unexpected_keys[0]})")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(trainable & set(getattr(result, "missing_keys", ())))
    if missing:
        raise UserError(
            f"{file}: checkpoint adapter lacks {len(missing)} of the {len(trainable)} LoRA weights (e.g. {missing[0]})"
            f"; delete {file.parent} to resume from the previous checkpoint"
        )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else error.__class__.__name__)[:200]


@dataclass
class SavedCheckpoint:
    """A checkpoint folder's files, read and checked, not yet put into a model (`read_checkpoint`)."""

    path: Path
    state: TrainerState
    adapter: dict
    optimizer_state: dict
    scheduler_state: dict
    rng: dict


def read_checkpoint(path: Path) -> SavedCheckpoint:
    """Every file of checkpoint folder `path`, read and checked before any model loads: a damaged one is one line in
    seconds, not after the base has loaded (the files are small: the LoRA weights and their optimizer moments)."""
    path = Path(path)
    state = read_state(path)  # refuses links first
    adapter = _load_adapter(path / ADAPTER_FILE)
    check_adapter_weights(path, f"delete {path} to resume from the previous checkpoint, or start a new run")
    return SavedCheckpoint(
        path,
        state,
        adapter,
        _load_tensors_file(path / "optimizer.pt"),
        _load_tensors_file(path / "scheduler.pt"),
        _load_tensors_file(path / "rng.pt"),
    )


def restore_checkpoint(saved: SavedCheckpoint, model, optimizer, scheduler) -> TrainerState:
    """Restore the adapter weights, optimizer, scheduler and RNG states `read_checkpoint` read."""
    path, optimizer_state = saved.path, saved.optimizer_state
    _restore_adapter(model, saved.adapter, path / ADAPTER_FILE)
    for file, restore in (
        ("optimizer.pt", lambda: _restore_optimizer(model, optimizer, optimizer_state)),
        ("scheduler.pt", lambda: scheduler.load_state_dict(saved.scheduler_state)),
        ("rng.pt", lambda: _set_rng_states(saved.rng)),
    ):
        try:
            restore()
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            raise _unreadable(path / file, f"{error.__class__.__name__}: not what dpo-cli saves there") from None
    # Sharded, the moments are DTensor slices: the whole state was read from optimizer.pt, so check that instead.
    problem = (
        _saved_moments_problem(optimizer_state) if sharding.is_sharded(model) else _optimizer_state_problem(optimizer)
    )
    if problem:
        raise _unreadable(path / "optimizer.pt", problem)
    return saved.state


def _optimizer_state_problem(optimizer) -> str | None:
    """What is wrong with the restored moments (load_state_dict checks neither): another shape than their weight's
    would fail inside the first step, a non-finite one would make every update NaN."""
    for param, per_param in optimizer.state.items():
        for name, value in per_param.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if value.dim() and value.shape != param.shape:
                return f"its {name} has shape {tuple(value.shape)}, its weight {tuple(param.shape)}"
            if not bool(torch.isfinite(value).all()):
                return f"its {name} holds NaN or infinite values"
    return None


def _saved_moments_problem(saved: dict) -> str | None:
    """`_optimizer_state_problem` for a whole saved state (keyed by parameter name): a non-finite moment."""
    for per_param in saved.get("state", {}).values():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"its {name} holds NaN or infinite values"
    return None


def _restore_optimizer(model, optimizer, saved: dict) -> None:
    if all(isinstance(key, int) for key in saved.get("state", {})):  # keyed by position: an earlier dpo-cli's
        optimizer.load_state_dict(saved)
    else:
        sharding.load_optimizer_state(model, optimizer, saved)


def apply_schedule(optimizer, scheduler, lr: float, weight_decay: float, multiplier) -> None:
    """Make the restored optimizer and scheduler follow this run's settings: peak `lr`, `weight_decay`, and the
    schedule `multiplier(step)`. With unchanged settings this reproduces exactly the values that were restored."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
        group["lr"] = lr * multiplier(scheduler.last_epoch)  # as LambdaLR.get_lr computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
