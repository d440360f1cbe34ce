"""Experiment trackers: each metrics record of a run also goes to TensorBoard and/or Weights & Biases.

Both are optional packages, named in the recipe (`report.trackers`, flag `--report-to`). `check_installed` runs
before any slow work, so a missing one is one line naming the `pip install`, not a traceback an hour in. A tracker
opens at the first record it is handed (nothing is created for a run that fails while loading) and takes metric
names as the Hugging Face Trainer logs them: `loss` -> `train/loss`, `eval_loss` -> `eval/loss`, at the record's step.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dpo_cli.config import ReportSection
from dpo_cli.errors import UserError

TENSORBOARD_DIR = "tensorboard"
# tracker name -> the module it imports and the package that provides it
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
NOT_METRICS = ("step", "time")  # record keys that place a point rather than being one


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_installed(names: list[str]) -> None:
    """One line naming the `pip install` for the first tracker whose package is missing."""
    for name in names:
        module, package = PACKAGES[name]
        if not is_installed(module):
            raise UserError(
                f"--report-to {name}: the {package} package is not installed; run `pip install {package}` "
                f"(or `pip install 'dpo-cli[{name}]'`), or drop {name} from --report-to / report.trackers"
            )


def tracker_tag(key: str) -> str:
    """`eval_rewards/chosen` -> `eval/rewards/chosen`, `loss` -> `train/loss`: the Trainer's names in both tools."""
    return f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their tracker tags (step and time are where the point goes, not values)."""
    return {
        tracker_tag(key): float(value)
        for key, value in record.items()
        if key not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    """Event files under `output_dir/tensorboard`, written with TensorBoard's own writer (via torch's wrapper)."""

    def __init__(self, output_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides points a crashed run wrote past its checkpoint, which a resumed run writes again.
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR), purge_step=first_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a running run's curves are visible in TensorBoard as they come

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (online, or offline files under `output_dir/wandb` when WANDB_MODE=offline)."""

    def __init__(self, output_dir: Path, settings: ReportSection, config: dict):
        import wandb

        self.run = wandb.init(
            project=settings.project or os.environ.get("WANDB_PROJECT") or "dpo-cli",
            name=settings.run_name or Path(output_dir).resolve().name,
            dir=str(output_dir),
            config=config,
            settings=wandb.Settings(console="off"),  # wandb must not wrap the terminal our progress bar draws on
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a recipe names; `log` hands each one every metrics record, `close` finishes them."""

    def __init__(self, output_dir: Path, settings: ReportSection, config: dict | None = None):
        check_installed(settings.trackers)
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.config = config or {}
        self.open: list = []
        self.opened = False

    def _open(self, first_step: int) -> None:
        self.opened = True
        for name in self.settings.trackers:
            if name == "tensorboard":
                self.open.append(TensorBoardTracker(self.output_dir, first_step))
            elif name == "wandb":
                self.open.append(WandbTracker(self.output_dir, self.settings, self.config))

    def log(self, record: dict) -> None:
        if not self.settings.trackers:
            return
        step = int(record["step"])
        if not self.opened:
            self._open(first_step=step)
        values = scalars(record)
        for tracker in self.open:
            tracker.log(step, values)

    def close(self) -> None:
        while self.open:
            self.open.pop().close()
