"""Every metric of a step in one record, written as one JSON line to `metrics.jsonl`.

The names are TRL's (`loss`, `rewards/chosen`, `rewards/accuracies`, ...), so curves from both tools line up.
Evaluation records carry the same names prefixed with `eval_`, as TRL logs them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path

import torch

from dpo_cli.errors import UserError
from dpo_cli.files import write_text_atomic
from dpo_cli.run.distributed import average_metrics, is_main_process
from dpo_cli.run.trackers import Trackers

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PairMetrics:
    """Running per-pair sums of the DPO metrics over any number of batches; `means()` gives per-pair averages."""

    def __init__(self):
        self.sums = dict.fromkeys(PAIR_METRICS, 0.0)
        self.count = 0

    def add(self, losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
        """Each argument is a (P,) tensor for the P pairs of one batch."""
        margins = chosen_rewards - rejected_rewards
        values = {
            "loss": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": margins,
            "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps,
        }
        for key, value in values.items():
            self.sums[key] += float(value.detach().double().sum())
        self.count += int(losses.shape[0])

    def means(self) -> dict[str, float]:
        return average_metrics(self.sums, self.count)


def is_finite(value: float | torch.Tensor) -> bool:
    return math.isfinite(float(value))


class MetricsLog:
    """Appends records to `metrics.jsonl`; on resume, drops records past the checkpoint so the curve is continuous.

    Each append is one write, fsynced; a write that fails (disk full) is cut back off, so the file only ever holds
    whole lines. A file torn anyway (killed by the kernel mid-write, an older dpo-cli) loses its incomplete last
    line on resume, which the checkpoint's step would have dropped in any case.

    Each record written is stamped with `time` (Unix seconds; the report's wall time) and handed to the trackers.
    """

    def __init__(self, path: Path, trackers: Trackers | None = None):
        self.path = Path(path)
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        if not self.path.exists() or not is_main_process():
            return
        kept = [line for line in self._lines() if json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def _lines(self) -> list[str]:
        """The complete lines: a torn last one (no newline, or not JSON) is left out; a broken earlier one is an
        error, since appends never produce it."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # tail: what follows the last newline, "" for a whole file
        if complete and tail == "" and not _parses(complete[-1]):
            complete = complete[:-1]
        for number, line in enumerate(complete, start=1):
            if line and not _parses(line):
                raise UserError(
                    f"{self.path}:{number}: not a JSON metrics record; remove the line (or the file) and rerun"
                )
        return [line for line in complete if line]

    def write(self, record: dict) -> None:
        if not is_main_process():
            return
        record = {**record, "time": round(time.time(), 3)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(standard_json(record), allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # never leave a torn line behind
                raise
        finally:
            os.close(fd)
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        """Finish the trackers' runs (flushing their files); metrics.jsonl itself is closed after every line."""
        if self.trackers is not None:
            self.trackers.close()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def standard_json(value):
    """`value` with every non-finite float as null: JSON has no NaN or Infinity, and Python's `NaN` tokens break
    other readers (jq, JavaScript, pandas' strict modes). The trackers still get the floats themselves."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: standard_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [standard_json(item) for item in value]
    return value


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
