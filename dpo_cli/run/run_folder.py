"""A finished or running training run read back from its folder: the metrics of metrics.jsonl and what its
recipe.yaml says about drawing them. The report (report.py) and the model card (model_card.py) read runs this way.

Run folders are shared, so both files are read as untrusted input. metrics.jsonl is streamed line by line and only
the columns asked for are kept, as arrays of floats (a 200 MB file once took 756 MB as dicts). A line that is not a
record with an integer step is one error line naming the file and line; a value that is not a finite number (a
string, a nested object, null, NaN, an integer of 400 digits) is not drawn, and counted.
"""

from __future__ import annotations

import json
import math
import os
import stat
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dpo_cli.config import RECIPE_FILENAME, read_recipe_file
from dpo_cli.errors import UserError, shown

METRICS_FILE = "metrics.jsonl"
MAX_LINE_BYTES = 1 << 20
"""A metrics record is a few hundred bytes; a longer line is not one of ours."""
MAX_STEP = 2**53
"""Steps are drawn as floats: above this they would no longer be told apart."""
MAX_MAGNITUDE = 1e18
"""Larger values are not drawn: they are not metrics of a run (tokens/s and Unix times are far below), and an
axis spanning them overflows matplotlib's tick arithmetic."""
TRAIN, EVAL = 1, 2
"""What a record holds: a training step ('loss'), an evaluation ('eval_loss'), or both."""


@dataclass
class RunFolder:
    """One run folder's metrics as columns (one float per record, NaN where a record has no usable value)."""

    name: str
    folder: Path
    steps: array = field(default_factory=lambda: array("q"))
    kinds: bytearray = field(default_factory=bytearray)
    columns: dict[str, array] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    beta: float | None = 0.1
    """β to turn rewards into log-ratios; None when the rewards are not log-ratios (SimPO has no reference)."""
    keep_all: bool = False
    """Keep every key's column (tests, small files); else only the columns made up front."""
    unusable: int = 0
    """Values of the kept columns that were not finite numbers (not drawn)."""
    first_unusable: str = ""

    @classmethod
    def from_records(cls, name: str, folder: Path, records: Iterable[dict], recipe: dict | None = None) -> RunFolder:
        """A run from records already in memory (tests, and callers that have them)."""
        recipe = recipe or {}
        run = cls(name, Path(folder), recipe=recipe, keep_all=True)
        for record in records:
            run.add(record, f"record {len(run.steps) + 1}")
        run.beta = drawing_beta(recipe, Path(folder) / RECIPE_FILENAME)
        return run

    def add(self, record: dict, where: str) -> None:
        """Append one record (its step already checked): its kept columns, NaN for missing or unusable values."""
        if self.keep_all:
            for key in record.keys() - self.columns.keys() - {"step"}:
                self.columns[key] = array("d", [math.nan]) * len(self.steps)
        self.steps.append(record["step"])
        self.kinds.append((TRAIN if "loss" in record else 0) | (EVAL if "eval_loss" in record else 0))
        for key, column in self.columns.items():
            value = record.get(key)
            number = _finite(value)
            if number is None:
                number = math.nan
                if key in record:  # an absent key is not a problem; null, "abc", NaN are
                    self.unusable += 1
                    self.first_unusable = self.first_unusable or f"{where}, {key!r} is {shown(value, 40)}"
            column.append(number)

    def rows(self, kind: int) -> list[int]:
        return [row for row, kinds in enumerate(self.kinds) if kinds & kind]

    def value(self, metric: str, row: int) -> float:
        """The metric of one record; NaN when it has none."""
        column = self.columns.get(metric)
        return column[row] if column is not None else math.nan

    def points(self, metric: str, scale: float = 1.0) -> tuple[array, array]:
        """(steps, values) of one metric, as compact arrays (matplotlib keeps what it is given: lists of Python
        floats would cost four times as much); a step logged twice (an eval at the last step, then the final eval)
        counts once, with its last value."""
        column = self.columns.get(metric)
        if column is None:
            return array("q"), array("d")
        by_step = {}
        for step, value in zip(self.steps, column, strict=True):
            scaled = value * scale
            if math.isfinite(scaled) and abs(scaled) <= MAX_MAGNITUDE:
                by_step[step] = scaled
        steps = array("q", sorted(by_step))
        return steps, array("d", (by_step[s] for s in steps))

    @property
    def has_train(self) -> bool:
        return any(kinds & TRAIN for kinds in self.kinds)


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and value.bit_length() > 64:  # beyond MAX_MAGNITUDE; float() may overflow
        return None
    number = float(value)
    return number if math.isfinite(number) and abs(number) <= MAX_MAGNITUDE else None


class _LongInteger:
    """A JSON integer of more digits than any metric has (beyond MAX_MAGNITUDE): kept as its length only, never
    converted (Python refuses 4,300 digits, and float() overflows past 308)."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits:,} digits"


def _parse_int(text: str) -> int | _LongInteger:
    return int(text) if len(text.lstrip("-")) <= 18 else _LongInteger(text)


def _decode(line: bytes) -> object:
    """The JSON value of one line; ValueError when it is not one."""
    try:
        return json.loads(line.decode("utf-8"), parse_int=_parse_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def metrics_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a metrics.jsonl, read line by line. A running run may be mid-way through
    its last line: that line is left out. Anything else that is not a record with an integer step is one error."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe would block, a device never end
            raise UserError(f"{path}: not a regular file; pass a folder written by `dpo-cli train`")
        handle = open(path, "rb")  # closed below, once streamed
    except FileNotFoundError:
        raise UserError(f"{path}: not found; pass a folder written by `dpo-cli train`") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.__class__.__name__})") from None
    with handle:
        number = 0
        try:
            while line := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                where = f"{path}:{number}"
                if len(line) > MAX_LINE_BYTES:
                    raise UserError(f"{where}: longer than {MAX_LINE_BYTES:,} bytes, not a metrics record; remove it")
                if not line.strip():
                    continue
                try:
                    record = _decode(line)
                except ValueError:  # also UnicodeDecodeError
                    if not line.endswith(b"\n"):  # no newline yet: the trainer is writing it right now
                        continue
                    raise UserError(f"{where}: not a JSON record; the file is damaged, remove that line") from None
                step = record.get("step") if isinstance(record, dict) else None
                if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
                    raise UserError(f"{where}: a metrics record needs an integer 'step' (0 or more); remove that line")
                yield where, record
        except OSError as error:
            raise UserError(f"{path}: cannot read it ({error.__class__.__name__})") from None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl as dicts (the model card's few; the report streams into columns)."""
    return [record for _, record in metrics_records(path)]


def drawing_beta(recipe: dict, path: Path) -> float | None:
    """β from a run's recipe (a shared file: checked); None for a reference-free run, whose rewards are not
    log-ratios. The drift panel divides by it, so only a positive finite number will do."""
    dpo = recipe.get("dpo") or {}
    reference_free = dpo.get("reference_free", False)
    if not isinstance(reference_free, bool):
        raise UserError(f"{path}: key dpo.reference_free is {shown(reference_free, 60)}, not true or false")
    if reference_free:
        return None
    beta = dpo.get("beta", 0.1)
    number = _finite(beta)
    if number is None or number <= 0:
        raise UserError(f"{path}: key dpo.beta is {shown(beta, 60)}, not a positive number; the drift is rewards / β")
    return number


def read_run(folder: Path, name: str | None = None, columns: Iterable[str] | None = None) -> RunFolder:
    """A run folder's `columns` of metrics.jsonl (None: every one) and its recipe, streamed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass the --output-dir of a `dpo-cli train` run")
    recipe_path = folder / RECIPE_FILENAME
    recipe = read_recipe_file(recipe_path) if recipe_path.exists() else {}
    kept = {key: array("d") for key in columns or ()}
    run = RunFolder(name or folder.name, folder, columns=kept, recipe=recipe, keep_all=columns is None)
    run.beta = drawing_beta(recipe, recipe_path)
    for where, record in metrics_records(folder / METRICS_FILE):
        run.add(record, where)
    if not run.has_train:
        raise UserError(f"{folder / METRICS_FILE}: no training step recorded yet; draw it after the first step")
    return run


def run_names(folders: list[Path]) -> list[str]:
    """Each run by its folder's name; folders of the same name are told apart by their parent's."""
    names = [Path(f).resolve().name for f in folders]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(f).resolve().parent.name}/{Path(f).resolve().name}" for f in folders]


def read_runs(folders: list[Path], columns: Iterable[str] = ()) -> list[RunFolder]:
    columns = list(columns)
    return [read_run(folder, name, columns) for folder, name in zip(folders, run_names(folders), strict=True)]
