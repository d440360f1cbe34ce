"""A finished or running training run read back from its folder: the records of metrics.jsonl and what its
recipe.yaml says about drawing them. The report (report.py) and the model card (model_card.py) read runs this way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dpo_cli.config import RECIPE_FILENAME, read_recipe_file
from dpo_cli.errors import UserError

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunFolder:
    """One run folder's records, and what its recipe says about drawing them."""

    name: str
    folder: Path
    records: list[dict]
    recipe: dict = field(default_factory=dict)

    @property
    def beta(self) -> float | None:
        """β to turn rewards into log-ratios; None when the rewards are not log-ratios (SimPO has no reference)."""
        dpo = self.recipe.get("dpo") or {}
        if dpo.get("reference_free"):
            return None
        return float(dpo.get("beta", 0.1))

    def points(self, metric: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric; a step logged twice (an eval at the last step, then the final eval)
        counts once, with its last value."""
        by_step = {
            int(r["step"]): float(r[metric]) * scale
            for r in self.records
            if isinstance(r.get(metric), int | float) and not isinstance(r.get(metric), bool)
        }
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    @property
    def has_eval(self) -> bool:
        return any("eval_loss" in r for r in self.records)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A running run may be mid-way through its last line: that line is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found; pass a folder written by `dpo-cli train`") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read it ({error.__class__.__name__})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline yet: the trainer is writing it right now
                continue
            raise UserError(f"{path}:{number}: not a JSON record; the file is damaged, remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number}: a metrics record needs an integer 'step'; remove that line")
        records.append(record)
    return records


def read_run(folder: Path, name: str | None = None) -> RunFolder:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass the --output-dir of a `dpo-cli train` run")
    records = read_metrics(folder / METRICS_FILE)
    if not any("loss" in r for r in records):
        raise UserError(f"{folder / METRICS_FILE}: no training step recorded yet; draw it after the first step")
    recipe_path = folder / RECIPE_FILENAME
    recipe = read_recipe_file(recipe_path) if recipe_path.exists() else {}
    return RunFolder(name or folder.name, folder, records, recipe)


def run_names(folders: list[Path]) -> list[str]:
    """Each run by its folder's name; folders of the same name are told apart by their parent's."""
    names = [Path(f).resolve().name for f in folders]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(f).resolve().parent.name}/{Path(f).resolve().name}" for f in folders]


def read_runs(folders: list[Path]) -> list[RunFolder]:
    return [read_run(folder, name) for folder, name in zip(folders, run_names(folders), strict=True)]
