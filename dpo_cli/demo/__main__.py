"""`make demo`: the whole job on a tiny model and data built on the spot, then a before/after table.

    python -m dpo_cli.demo [FOLDER]     (default: demo-out)

It builds a tiny Llama (briefly pretrained on the task's sentences) and cheerful-vs-gloomy preference pairs
(dpo_cli/demo/tiny.py), then runs the commands a user would, printing each before it runs: train -> report (the curves,
FOLDER/report.png) -> eval (with side-by-side samples) -> merge-adapter. The table compares the reference (the base,
adapters off) with the trained policy on the held-out pairs and on their own samples.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpo_cli.demo.tiny import build_demo, happy_score

BETA = 0.1


def _run(console: Console, *args: str) -> None:
    console.print(f"\n[bold]$ dpo-cli {shlex.join(args)}[/bold]")
    result = subprocess.run([sys.executable, "-m", "dpo_cli", *args])
    if result.returncode != 0:
        raise SystemExit(result.returncode)


def _read_jsonl(path: Path) -> list[dict]:
    # split("\n"), not splitlines(): generated text may hold U+0085 or U+2028, which splitlines() breaks on.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def before_after(per_pair: list[dict], samples: list[dict]) -> list[tuple[str, float, float]]:
    """(row label, reference value, policy value); the reference log-probs are policy minus reward/β."""
    ref_chosen = [p["logps_chosen"] - p["reward_chosen"] / BETA for p in per_pair]
    ref_rejected = [p["logps_rejected"] - p["reward_rejected"] / BETA for p in per_pair]
    return [
        (
            "pairs where log p(chosen) > log p(rejected)",
            _mean(c > r for c, r in zip(ref_chosen, ref_rejected, strict=True)),
            _mean(p["logps_chosen"] > p["logps_rejected"] for p in per_pair),
        ),
        ("mean log p(chosen)", _mean(ref_chosen), _mean(p["logps_chosen"] for p in per_pair)),
        ("mean log p(rejected)", _mean(ref_rejected), _mean(p["logps_rejected"] for p in per_pair)),
        (
            "own samples: cheerful minus gloomy words",
            _mean(happy_score(s["reference"]) for s in samples),
            _mean(happy_score(s["policy"]) for s in samples),
        ),
    ]


def main(folder: str = "demo-out") -> None:
    console = Console()
    root = Path(folder)
    for stale in ("run", "merged"):  # a rerun starts clean: train refuses a folder holding an earlier run
        shutil.rmtree(root / stale, ignore_errors=True)
    console.print(f"building the tiny model and data in {root}/ ...")
    paths = build_demo(root)
    run, merged = root / "run", root / "merged"
    _run(
        console,
        "train",
        "--model", str(paths["model"]),
        "--data", str(paths["train"]),
        "--eval-data", str(paths["test"]),
        "--output-dir", str(run),
        "--max-steps", "60",
        "--batch-size", "8",
        "--lr", "5e-4",
        "--beta", str(BETA),
        "--set", "training.save_steps=20",
        "--set", "training.eval_steps=10",
    )  # fmt: skip
    _run(console, "report", str(run), "--output", str(root / "report.png"))
    _run(
        console,
        "eval",
        "--adapter", str(run),
        "--data", str(paths["test"]),
        "--output", str(root / "eval.json"),
        "--per-example", str(root / "eval-pairs.jsonl"),
        "--generate", "24",
        "--max-new-tokens", "16",
        "--samples", str(root / "samples.jsonl"),
    )  # fmt: skip
    _run(console, "merge-adapter", "--adapter", str(run), "--output", str(merged), "--dtype", "float32", "--force")

    rows = before_after(_read_jsonl(root / "eval-pairs.jsonl"), _read_jsonl(root / "samples.jsonl"))
    table = Table(title=f"held-out pairs: {root / 'test.jsonl'}")
    table.add_column("")
    table.add_column("before (base)", justify="right")
    table.add_column("after DPO", justify="right")
    for label, before, after in rows:
        table.add_row(label, f"{before:.3f}", f"{after:.3f}")
    console.print()
    console.print(table)
    console.print(f"adapter: {run}/   merged model: {merged}/   samples side by side: {root / 'samples.jsonl'}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
