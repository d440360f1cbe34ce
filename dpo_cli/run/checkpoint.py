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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory, remove_folder, remove_stale_temporaries, write_bytes
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
        model.save_pretrained(tmp, state_dict=whole.adapter)  # a plain PEFT adapter folder either way
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


def read_state(path: Path) -> TrainerState:
    """The trainer_state.json of checkpoint folder `path`, or one line saying it cannot be used."""
    file = Path(path) / STATE_FILE
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(TrainerState)}
        return TrainerState(**{key: value for key, value in values.items() if key in known})
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as error:
        raise _unreadable(file, error.__class__.__name__) from None


def _load_tensors_file(file: Path):
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise _unreadable(file, "it holds objects other than tensors and numbers, which are never loaded") from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise _unreadable(file, error.__class__.__name__) from None


def _load_adapter(file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as error:
        raise _unreadable(file, error.__class__.__name__) from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore the adapter weights, optimizer, scheduler and RNG states of checkpoint folder `path`."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    state = read_state(path)
    adapter = _load_adapter(path / ADAPTER_FILE)
    optimizer_state = _load_tensors_file(path / "optimizer.pt")
    scheduler_state = _load_tensors_file(path / "scheduler.pt")
    rng = _load_tensors_file(path / "rng.pt")
    if sharding.is_sharded(model):
        unexpected = sharding.load_peft_adapter_state(model, adapter)
    else:
        unexpected = getattr(set_peft_model_state_dict(model, adapter), "unexpected_keys", None)
    if unexpected:
        raise UserError(f"{path}: checkpoint adapter does not fit this model/recipe (e.g. {unexpected[0]})")
    for file, restore in (
        ("optimizer.pt", lambda: _restore_optimizer(model, optimizer, optimizer_state)),
        ("scheduler.pt", lambda: scheduler.load_state_dict(scheduler_state)),
        ("rng.pt", lambda: _set_rng_states(rng)),
    ):
        try:
            restore()
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            raise _unreadable(path / file, f"{error.__class__.__name__}: not what dpo-cli saves there") from None
    return state


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
