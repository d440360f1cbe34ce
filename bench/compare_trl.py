"""Named presets for the dpo-cli vs TRL 1.16 training benchmark (issue 10).

A thin front end over bench/bench_train.py: each preset is a fixed set of bench_train options, so the
model, data, batch and steps are written down once and reused. `--dry-run` prints the resolved bench_train
command line without loading anything; otherwise bench_train runs it (extra options pass through).

Each dpo-cli layout is its own row (`--layouts`; the row of the layout `auto` picks for the model is marked
"default"), TRL's is one more, and the script fails (exit 1, one line) when a dpo-cli row's step-1 loss differs from
TRL's by more than `--loss-rtol`. The `cpu` preset reads ../shared's HH-RLHF helpful-base the way `dpo-cli train`
does. `--whole-process` instead times the real `dpo-cli train` command against a TRL script doing the same job, each
a process from start to exit (bench/whole_process.py).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA_1B = ["--hidden", "2048", "--layers", "16", "--heads", "32", "--kv-heads", "8"]
LLAMA_1B += ["--intermediate", "8192", "--vocab", "128256"]
LLAMA_8B = ["--hidden", "4096", "--layers", "32", "--heads", "32", "--kv-heads", "8"]
LLAMA_8B += ["--intermediate", "14336", "--vocab", "128256"]

PRESETS: dict[str, list[str]] = {
    "cpu": ["--model", "stories260K", "--data", "hh", "--max-length", "512", "--batch-size", "8"]
    + ["--layouts", "padded,packed,shared-prompt", "--threads", "1", "--warmup", "1", "--steps", "6"]
    + ["--repeats", "1"],
    "cpu-synthetic": ["--model", "synthetic", "--data", "hh-synthetic", "--max-length", "512", "--batch-size", "8"]
    + ["--layouts", "padded,packed,shared-prompt", "--threads", "1"],
    "gpu": ["--model", "synthetic", *LLAMA_1B, "--data", "hh-synthetic", "--max-length", "1280"]
    + ["--batch-size", "8", "--lora-r", "16", "--device", "cuda", "--layouts", "padded,packed,shared-prompt"],
    "gpu-8b": ["--model", "synthetic", *LLAMA_8B, "--data", "hh-synthetic", "--max-length", "2048"]
    + ["--batch-size", "1", "--device", "cuda"],
}


def resolve(preset: str, extra: list[str]) -> list[str]:
    """The bench_train argv for a preset; options in `extra` come last, so they win."""
    return [*PRESETS[preset], *extra]


WHOLE_PROCESS = {
    "cpu": ["--model", "stories260K", "--data", "hh", "--max-length", "512", "--batch-size", "8", "--steps", "12"]
    + ["--threads", "1"],
}
"""The `--whole-process` settings of each preset that has them (whole_process.py runs on CPU only)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and stop")
    parser.add_argument(
        "--whole-process",
        action="store_true",
        help="time `dpo-cli train` against a TRL script, each a whole process (bench/whole_process.py)",
    )
    args, extra = parser.parse_known_args(argv)
    if args.whole_process:
        if args.preset not in WHOLE_PROCESS:
            parser.error(f"--whole-process: preset {args.preset} has no whole-process settings; use cpu")
        resolved = [*WHOLE_PROCESS[args.preset], *extra]
        if args.dry_run:
            print(f"preset {args.preset}: bench/whole_process.py {shlex.join(resolved)}")
            return
        import whole_process

        whole_process.main(resolved)
        return
    resolved = resolve(args.preset, extra)
    if args.dry_run:
        print(f"preset {args.preset}: bench/bench_train.py {shlex.join(resolved)}")
        return
    import bench_train

    bench_train.parse_args(resolved)
    bench_train.main(resolved)


if __name__ == "__main__":
    main()
