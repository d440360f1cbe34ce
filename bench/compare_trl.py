"""Named presets for the dpo-cli vs TRL 1.16 training benchmark (issue 10).

A thin front end over bench/bench_train.py: each preset is a fixed set of bench_train options, so the
model, data, batch and steps are written down once and reused. `--dry-run` prints the resolved bench_train
command line without loading anything; otherwise bench_train runs it (extra options pass through).

Not yet here: a row per dpo-cli layout (bench_train has no --layout hook yet) and the HH-RLHF file for the
`cpu` preset (it uses stories data until the file is prepared the way `--data FILE` expects).
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
    "cpu": ["--model", "stories260K", "--data", "stories", "--max-length", "512", "--batch-size", "8"],
    "cpu-synthetic": ["--model", "synthetic", "--data", "hh-synthetic", "--max-length", "512", "--batch-size", "8"],
    "gpu": ["--model", "synthetic", *LLAMA_1B, "--data", "hh-synthetic", "--max-length", "1280"]
    + ["--batch-size", "8", "--lora-r", "16", "--device", "cuda"],
    "gpu-8b": ["--model", "synthetic", *LLAMA_8B, "--data", "hh-synthetic", "--max-length", "2048"]
    + ["--batch-size", "1", "--device", "cuda"],
}


def resolve(preset: str, extra: list[str]) -> list[str]:
    """The bench_train argv for a preset; options in `extra` come last, so they win."""
    return [*PRESETS[preset], *extra]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and stop")
    args, extra = parser.parse_known_args(argv)
    resolved = resolve(args.preset, extra)
    if args.dry_run:
        print(f"preset {args.preset}: bench/bench_train.py {shlex.join(resolved)}")
        return
    import bench_train

    bench_train.parse_args(resolved)
    bench_train.main(resolved)


if __name__ == "__main__":
    main()
