"""Reference log-prob cache timing: the reference pass over a split, then reading its cache entry, then optimizer
steps with the cached reference against steps that score it live. A user's setup (`build_run`) and step
(`train_step`), on a throwaway cache and output folder.

    OMP_NUM_THREADS=2 python3 bench/bench_reference.py --model ../shared/models/stories260K \
        --data ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz --max-length 512 --batch-size 8 --steps 6
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(args, workdir: Path, name: str, precompute_ref: str):
    """(the run, seconds build_run took, its reference line)."""
    from rich.console import Console

    from dpo_cli.config import recipe_from_dict
    from dpo_cli.run.setup import build_run

    recipe = recipe_from_dict(
        {
            "model": {"path": args.model, "gradient_checkpointing": False, "device": args.device},
            "data": {
                "train": [args.data],
                "max_length": args.max_length,
                "cache_dir": str(workdir / "cache"),
                "on_invalid": "skip",
            },
            "training": {
                "output_dir": str(workdir / name),
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "eval_batch_size": args.batch_size,
                "save_steps": 0,
            },
            "dpo": {"precompute_ref": precompute_ref},
        }
    )
    out = io.StringIO()
    started = time.perf_counter()
    run = build_run(recipe, console=Console(file=out, width=400))
    seconds = time.perf_counter() - started
    said = [line for line in out.getvalue().splitlines() if "reference log-probs" in line]
    return run, seconds, said


def step_seconds(runs: list, steps: int) -> list[list[float]]:
    """Seconds of each step of each run, the runs' steps taken in turn so that a busy machine slows them alike (the
    same pairs in the same order: the runs share the seed)."""
    from dpo_cli.run.loop import train_step

    times: list[list[float]] = [[] for _ in runs]
    for _ in range(steps):
        for run, seconds in zip(runs, times, strict=True):
            started = time.perf_counter()
            train_step(run)
            seconds.append(time.perf_counter() - started)
    return [seconds[1:] for seconds in times]  # the first step warms up allocators and kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dpo-cli-bench-reference-") as folder:
        workdir = Path(folder)
        build(args, workdir, "prepare", "false")  # the data cache is filled first, so the setups below compare
        _, computed, said = build(args, workdir, "compute", "true")
        print(f"setup computing the reference: {computed:.1f} s; {said[-1]}")
        cached_run, read, said = build(args, workdir, "read", "true")
        print(f"setup reading the cache: {read:.1f} s; {said[-1]}")
        live_run, live_setup, _ = build(args, workdir, "live", "false")
        print(f"setup with the live reference: {live_setup:.1f} s")
        cached, live = step_seconds([cached_run, live_run], args.steps)
        print(
            f"step (batch {args.batch_size}, median of {len(live)}): live reference {statistics.median(live):.3f} s, "
            f"cached reference {statistics.median(cached):.3f} s "
            f"({statistics.median(live) / statistics.median(cached):.2f}x)"
        )


if __name__ == "__main__":
    main()
