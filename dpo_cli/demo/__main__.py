"""`make demo`: the whole job on a tiny model and data built on the spot, then a before/after table.

    python -m dpo_cli.demo [FOLDER]     (default: demo-out)

It builds a tiny Llama (its base weights briefly pretrained on the task's sentences, cheerful and gloomy alike, so
it speaks the language with no preference) and cheerful-vs-gloomy preference pairs (dpo_cli/demo/tiny.py), then runs
the commands a user would, printing each before it runs: sft on the pairs' preferred completions (the DPO paper's
preferred-FT) -> eval of the SFT adapter (against the base) -> train --from-adapter (DPO from the SFT adapter, which
is its reference) -> report (the curves, FOLDER/report.png) -> eval (against the SFT reference, with side-by-side
samples) -> merge-adapter. The table compares the base, the SFT model and the DPO policy on the held-out pairs and
on their own samples.
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


def _eval(console: Console, adapter: Path, test: Path, root: Path, name: str) -> tuple[list[dict], list[dict]]:
    """`dpo-cli eval` of `adapter` on the held-out pairs, with samples; (its per-pair rows, its samples)."""
    per_pair, samples = root / f"{name}-pairs.jsonl", root / f"{name}-samples.jsonl"
    _run(
        console,
        "eval",
        "--adapter", str(adapter),
        "--data", str(test),
        "--output", str(root / f"{name}.json"),
        "--per-example", str(per_pair),
        "--generate", "24",
        "--max-new-tokens", "16",
        "--samples", str(samples),
    )  # fmt: skip
    return _read_jsonl(per_pair), _read_jsonl(samples)


def main(folder: str = "demo-out") -> None:
    console = Console()
    root = Path(folder)
    for stale in ("sft", "run", "merged"):  # a rerun starts clean: sft and train refuse a folder holding a run
        shutil.rmtree(root / stale, ignore_errors=True)
    console.print(f"building the tiny model and data in {root}/ ...")
    paths = build_demo(root)
    sft, run, merged = root / "sft", root / "run", root / "merged"
    _run(
        console,
        "sft",
        "--model", str(paths["model"]),
        "--data", str(paths["train"]),
        "--eval-data", str(paths["test"]),
        "--output-dir", str(sft),
        "--max-steps", "30",
        "--batch-size", "8",
        "--lr", "5e-4",
        "--set", "training.save_steps=0",
    )  # fmt: skip
    sft_pairs, sft_samples = _eval(console, sft, paths["test"], root, "eval-sft")  # against the base
    _run(
        console,
        "train",
        "--from-adapter", str(sft),
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
    dpo_pairs, dpo_samples = _eval(console, run, paths["test"], root, "eval")  # against the SFT reference
    _run(console, "merge-adapter", "--adapter", str(run), "--output", str(merged), "--dtype", "float32", "--force")

    base_and_sft = before_after(sft_pairs, sft_samples)  # eval of the SFT adapter: reference = the base
    sft_and_dpo = before_after(dpo_pairs, dpo_samples)  # eval of the DPO run: reference = base + SFT adapter
    table = Table(title=f"held-out pairs: {root / 'test.jsonl'}")
    table.add_column("")
    for name in ("base", "after SFT", "after DPO"):
        table.add_column(name, justify="right")
    for (label, base, after_sft), (_, _, after_dpo) in zip(base_and_sft, sft_and_dpo, strict=True):
        table.add_row(label, f"{base:.3f}", f"{after_sft:.3f}", f"{after_dpo:.3f}")
    console.print()
    console.print(table)
    console.print(
        f"sft adapter: {sft}/   dpo adapter: {run}/   merged model: {merged}/   samples side by side: "
        f"{root / 'eval-sft-samples.jsonl'} (base, SFT), {root / 'eval-samples.jsonl'} (SFT, DPO)"
    )


if __name__ == "__main__":
    main(*sys.argv[1:2])
