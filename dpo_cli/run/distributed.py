"""Who writes files and how metrics are averaged, in one place.

Today dpo-cli runs as one process. When `torchrun` support lands, this module is what changes: the main process
alone writes checkpoints, adapters and metrics, and metrics are averaged over ranks here, weighted by the pairs
each rank saw. The trainer only ever asks `is_main_process()` and `average_metrics()`.
"""

from __future__ import annotations

import os

from dpo_cli.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_single_process() -> None:
    if world_size() > 1:
        raise UserError(
            f"WORLD_SIZE={world_size()}: multi-process (torchrun/DDP) training is not supported yet; "
            "run one process per GPU job"
        )


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def average_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    """Per-pair means from per-pair sums. With several ranks, sums and counts are all-reduced first."""
    return {key: value / max(count, 1) for key, value in sums.items()}
