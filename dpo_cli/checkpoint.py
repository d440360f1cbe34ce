"""Resumable checkpoints: adapter, optimizer, scheduler, RNG states and the position in the data.

A checkpoint folder is built under a temporary name and renamed into place when complete, so a run killed while
saving leaves the previous checkpoint intact and never a half-written one. Resuming from step N replays exactly the
batches an uninterrupted run would have seen after step N.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int
    """Optimizer steps completed."""
    micro_batches_done: int
    """Micro-batches consumed from the (epoch-concatenated) data stream: where to continue."""
    total_steps: int
    num_tokens: int = 0


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: TrainerState, keep: int) -> Path:
    target = Path(output_dir) / CHECKPOINTS_DIR / f"step-{state.step:06d}"
    with atomic_directory(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_states(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        adapter = load_file(str(path / "adapter_model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng = torch.load(path / "rng.pt", weights_only=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path}: checkpoint is unreadable ({error.__class__.__name__}); delete it to resume from the previous one"
        ) from None
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{path}: checkpoint adapter does not fit this model/recipe (e.g. {result.unexpected_keys[0]})")
    _set_rng_states(rng)
    return state


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
