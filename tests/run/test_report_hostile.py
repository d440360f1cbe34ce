"""`dpo-cli report` on run folders someone else wrote: every field of recipe.yaml and metrics.jsonl mangled ends in a
drawn report or one line (exit 2), never a traceback; the figure never replaces a file that is not a report.

Drawing costs seconds per figure on a loaded CI machine, so the fuzz cases draw onto stand-in axes that check every
value handed to matplotlib is a finite, drawable number; a few of the nastiest folders are drawn for real.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_cli.files import write_text_atomic
from dpo_cli.run import report
from dpo_cli.run.metrics import MetricsLog
from dpo_cli.run.run_folder import MAX_MAGNITUDE
from tests.conftest import REPO, run_cli_inprocess
from tests.test_config import _alias_bomb

TRAIN_RECORD = {
    "step": 1,
    "loss": 0.69,
    "rewards/chosen": 0.01,
    "rewards/rejected": -0.01,
    "rewards/accuracies": 0.5,
    "rewards/margins": 0.02,
    "learning_rate": 1e-4,
    "grad_norm": 1.5,
    "tokens_per_second": 900.0,
    "num_tokens": 300,
    "time": 1764000000.0,
}
EVAL_RECORD = {
    "step": 3,
    "eval_loss": 0.6,
    "eval_rewards/chosen": 0.05,
    "eval_rewards/rejected": -0.05,
    "eval_rewards/accuracies": 0.75,
    "eval_rewards/margins": 0.1,
    "time": 1764000003.0,
}
RECIPE = {
    "model": {"path": "models/tiny", "quantize": True},
    "dpo": {"beta": 0.1, "loss_type": ["sigmoid"], "reference_free": False},
    "training": {"max_steps": 3},
}
# Raw JSON (metrics) and YAML (recipe) texts put in place of one value; None removes the key.
JSON_MANGLES = {
    "string": '"abc"',
    "int-400-digits": "1" * 400,
    "int-5000-digits": "-" + "7" * 5000,
    "float-max": "1.7e308",
    "float-overflow": "1e999",
    "negative": "-1",
    "zero": "0",
    "nan": "NaN",
    "inf": "Infinity",
    "minus-inf": "-Infinity",
    "null": "null",
    "true": "true",
    "nested": '{"a": [1, {"b": 2}]}',
    "deep": "[" * 20000 + "]" * 20000,
    "missing": None,
}
YAML_MANGLES = {
    "string": "abc",
    "int-400-digits": "1" * 400,
    "int-5000-digits": "7" * 5000,
    "float-overflow": "1.0e+999",
    "negative": "-1",
    "zero": "0",
    "tiny": "1.0e-300",
    "nan": ".nan",
    "inf": ".inf",
    "null": "null",
    "true": "true",
    "nested": "{a: [1, {b: 2}]}",
    "list": "[1, 2]",
    "date": "2001-13-45",
    "deep": "[" * 5000 + "]" * 5000,
    "missing": None,
}
METRIC_KEYS = ["step", *[k for k in TRAIN_RECORD if k != "step"], *[k for k in EVAL_RECORD if k != "step"][:-1]]
RECIPE_KEYS = ["model", "model.path", "dpo", "dpo.beta", "dpo.loss_type", "dpo.reference_free", "training"]


def _json_line(record: dict, key: str, raw: str | None) -> str:
    if key not in record:
        return json.dumps(record)
    if raw is None:
        return json.dumps({k: v for k, v in record.items() if k != key})
    return json.dumps({**record, key: "@MANGLED@"}).replace('"@MANGLED@"', raw)


def _metrics_text(key: str | None = None, raw: str | None = None, last_only: bool = False) -> str:
    records = [{**TRAIN_RECORD, "step": s, "num_tokens": 300 * s, "time": TRAIN_RECORD["time"] + s} for s in (1, 2, 3)]
    records.append(EVAL_RECORD)
    lines = [
        _json_line(record, key, raw) if key and (not last_only or index >= 2) else json.dumps(record)
        for index, record in enumerate(records)
    ]
    return "\n".join(lines) + "\n"


def _recipe_text(dotted: str | None = None, raw: str | None = None) -> str:
    """The recipe as YAML with one section or key replaced by the raw YAML text (or removed)."""
    import yaml

    values = json.loads(json.dumps(RECIPE))
    if dotted is None:
        return yaml.safe_dump(values)
    section, _, key = dotted.partition(".")
    holder, name = (values[section], key) if key else (values, section)
    holder[name] = "@MANGLED@"
    text = yaml.safe_dump(values, width=10**9)
    if raw is None:
        return "\n".join(line for line in text.splitlines() if "@MANGLED@" not in line) + "\n"
    return text.replace("'@MANGLED@'", raw)


def _run_folder(root: Path, metrics: str, recipe: str | None) -> Path:
    folder = root / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(metrics)
    if recipe is not None:
        (folder / "recipe.yaml").write_text(recipe)
    return folder


class _CheckingAxes:
    """Stands in for a matplotlib Axes: every plotted value must be a finite number matplotlib can scale."""

    def __init__(self):
        self.lines = []

    def plot(self, steps, values, **style):
        assert len(steps) == len(values) > 0
        for number in [*steps, *values]:
            assert isinstance(number, numbers.Real) and math.isfinite(number) and abs(number) <= MAX_MAGNITUDE
        self.lines.append((steps, values))

    def get_lines(self):
        return self.lines

    def __getattr__(self, name):  # titles, labels, grids, legends, tick locators: nothing to check
        return self

    def __call__(self, *args, **kwargs):
        return self


def _checking_draw(runs, path):
    """report.draw_report's work without matplotlib's rendering: the panels' data, the title, a file."""
    report.output_format(path)
    panels = [report._draw_panel(_CheckingAxes(), panel, runs) for panel in report.PANELS]
    title = report._title(runs)
    assert len(title) < 400
    write_text_atomic(Path(path), "drawn: " + json.dumps(panels))  # as the real one: renamed over a symlink
    return report.ReportFigure(Path(path), (1, 1), [run.name for run in runs], panels)


def _one_line_or_drawn(code: int, stdout: str, stderr: str, output: Path, names: tuple[str, ...]) -> str:
    assert "Traceback" not in stderr + stdout
    if code == 0:
        assert output.read_text().startswith("drawn: ")
        assert len(stderr.splitlines()) <= 1, stderr  # at most the note of values not drawn
        return "drawn"
    assert code == 2, (code, stderr[:500])
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and len(stderr) < 600, stderr[:600]
    assert any(name in stderr for name in names), stderr
    assert not output.exists(), "nothing written"
    return "refused"


@pytest.fixture
def checking_draw(monkeypatch):
    monkeypatch.setattr(report, "draw_report", _checking_draw)


@pytest.mark.parametrize(
    ("key", "mangle", "last_only"),
    [
        (key, mangle, (i + j) % 2 == 1)  # every record or the last two, in turn: both for each key and each mangle
        for i, key in enumerate(METRIC_KEYS)
        for j, mangle in enumerate(JSON_MANGLES)
    ],
)
def test_fuzz_metrics_fields(tmp_path, capsys, checking_draw, key, mangle, last_only):
    """A value mangled in every record, or in the last training record and the eval record."""
    folder = _run_folder(tmp_path, _metrics_text(key, JSON_MANGLES[mangle], last_only), _recipe_text())
    output = tmp_path / "r.png"
    code, stdout, stderr = run_cli_inprocess(capsys, "report", folder, "--output", output)
    outcome = _one_line_or_drawn(code, stdout, stderr, output, ("metrics.jsonl:",))
    no_train_step = key == "loss" and mangle == "missing" and not last_only
    if key == "step" and mangle not in ("zero", "negative") or mangle == "deep" or no_train_step:
        assert outcome == "refused"
    elif key != "step":
        assert outcome == "drawn", "a bad value is set aside, the rest of the run is drawn"
    if outcome == "drawn" and mangle in ("string", "nan", "null", "nested", "int-5000-digits", "float-overflow"):
        assert "not drawn, not a finite number within ±1e18 (the first: " in stderr and "metrics.jsonl:" in stderr


@pytest.mark.parametrize("mangle", list(YAML_MANGLES))
@pytest.mark.parametrize("key", RECIPE_KEYS)
def test_fuzz_recipe_fields(tmp_path, capsys, checking_draw, key, mangle):
    folder = _run_folder(tmp_path, _metrics_text(), _recipe_text(key, YAML_MANGLES[mangle]))
    output = tmp_path / "r.png"
    code, stdout, stderr = run_cli_inprocess(capsys, "report", folder, "--output", output)
    outcome = _one_line_or_drawn(code, stdout, stderr, output, ("recipe.yaml",))
    if key == "dpo.beta" and mangle not in ("missing", "tiny"):
        assert outcome == "refused", "only a positive finite β can divide the rewards"


@pytest.mark.parametrize(
    ("recipe", "metrics", "message"),
    [
        ("dpo:\n  beta: 0\n", None, "recipe.yaml: key dpo.beta is 0, not a positive number"),
        ("dpo: a string\n", None, "recipe.yaml: recipe section 'dpo' must be a mapping of keys to values, got str"),
        ("dpo:\n  beta: abc\n", None, "recipe.yaml: key dpo.beta is 'abc', not a positive number"),
        ("dpo:\n  reference_free: maybe\n", None, "key dpo.reference_free is 'maybe', not true or false"),
        ("- 1\n- 2\n", None, "recipe.yaml: a recipe must be a mapping of sections"),
        (_alias_bomb(8), None, "recipe.yaml:6: expands to more than 10,000 values"),
        (None, '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": ' + "9" * 400 + "}\n", None),
        (None, '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": ' + "9" * 5000 + "}\n", None),
        (None, '{"step": ' + "9" * 400 + ', "loss": 0.5}\n', "metrics.jsonl:1: a metrics record needs an integer"),
        (None, '{"step": ' + "9" * 5000 + ', "loss": 0.5}\n', "metrics.jsonl:1: a metrics record needs an integer"),
        (None, '{"step": 1, "loss": 0.5}\n' + "[" * 100000 + "\n", "metrics.jsonl:2: not a JSON record"),
        (None, '{"step": 1, "loss": 0.5}\n' + "x" * (2 << 20) + "\n", "metrics.jsonl:2: longer than 1,048,576 bytes"),
    ],
    ids=["beta-0", "dpo-string", "beta-abc", "reference-free-maybe", "recipe-list", "alias-bomb",
         "400-digits", "5000-digits", "step-400-digits",
         "step-5000-digits", "deep", "long-line"],
)  # fmt: skip
def test_the_cases_found_are_one_line_or_a_counted_value(tmp_path, capsys, checking_draw, recipe, metrics, message):
    """Each was a traceback on main: ZeroDivisionError, AttributeError, ValueError, OverflowError, ValueError."""
    folder = _run_folder(tmp_path, metrics or _metrics_text(), recipe)
    output = tmp_path / "r.png"
    code, stdout, stderr = run_cli_inprocess(capsys, "report", folder, "--output", output)
    if message is None:
        assert code == 0 and "Traceback" not in stderr
        digits = "400" if "9" * 401 not in metrics else "5,000"
        assert stderr.strip() == f"{folder / 'metrics.jsonl'}: 1 value not drawn, not a finite number within ±1e18 " + (
            f"(the first: {folder / 'metrics.jsonl'}:2, 'loss' is an integer of {digits} digits)"
        )
        assert re.search(r"│ loss \(last step\) +│ +- │", stdout), stdout
    else:
        assert code == 2 and len(stderr.splitlines()) == 1 and message in stderr, stderr[:500]


def test_nasty_folders_are_drawn_for_real(tmp_path, capsys, monkeypatch):
    """Matplotlib itself on the values that pass: the largest allowed, one record, mixed garbage, a tiny β."""
    monkeypatch.setattr(report, "DPI", 10)
    records = [
        {"step": 1, "loss": MAX_MAGNITUDE, "rewards/chosen": -MAX_MAGNITUDE, "grad_norm": "abc", "time": None},
        {"step": 2, "loss": -MAX_MAGNITUDE, "rewards/chosen": 1e-300, "learning_rate": {"a": 1}},
        {"step": 2, "eval_loss": 0.5, "eval_rewards/chosen": [1]},
    ]
    folder = _run_folder(tmp_path, "".join(json.dumps(r) + "\n" for r in records), "dpo:\n  beta: 1.0e-300\n")
    output = tmp_path / "nasty.png"
    code, stdout, stderr = run_cli_inprocess(capsys, "report", folder, "--output", output)
    assert code == 0, stderr
    assert report.is_report_file(output)
    assert "4 values not drawn" in stderr


# Memory: metrics.jsonl is streamed into columns ------------------------------------------------------------------

MEASURE = """
import resource, sys
from pathlib import Path
from dpo_cli.run.report import COLUMNS, summarize, summary_rows
from dpo_cli.run.run_folder import read_runs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary_rows([summarize(run) for run in read_runs([Path(sys.argv[1])], COLUMNS)])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_reading_a_large_metrics_file_holds_a_fraction_of_it(tmp_path):
    """40 MB of records (80,000 steps): the columns a report reads, as floats, take about 16 MB; as dicts they
    took 235 MB (the issue measured 3.6x the file's size for `dpo-cli report`)."""
    folder = tmp_path / "run"
    folder.mkdir()
    record = {**TRAIN_RECORD, "logps/chosen": -123.456789, "logps/rejected": -234.567891, "epoch": 0.123456789}
    line = json.dumps({**record, "step": 111111111, "loss": 0.222222222}) + "\n"
    line = line.replace("0.222222222", "%r").replace("111111111", "%d")
    with open(folder / "metrics.jsonl", "w") as handle:
        steps = 40_000_000 // len(line)
        handle.writelines(line % (step, 1 / step) for step in range(1, steps + 1))
    size = (folder / "metrics.jsonl").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", MEASURE, folder], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout)
    assert grown < 0.75 * size, f"{grown / 1e6:.0f} MB held for a {size / 1e6:.0f} MB file"


# Writing: standard JSON, and never over a file that is not a report ----------------------------------------------


def test_metrics_jsonl_holds_standard_json_with_null_for_non_finite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).write({"step": 1, "loss": math.nan, "rewards/chosen": math.inf, "grad_norm": 1.0})

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    record = json.loads(path.read_text(), parse_constant=refuse)
    assert record["loss"] is None and record["rewards/chosen"] is None and record["grad_norm"] == 1.0
    from dpo_cli.run.model_card import _metrics_table

    assert "| loss | - |" in "\n".join(_metrics_table([record]))


def test_report_refuses_to_replace_a_file_that_is_not_a_report(tmp_path, capsys, checking_draw):
    folder = _run_folder(tmp_path, _metrics_text(), _recipe_text())
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n a holiday photo")
    code, _, stderr = run_cli_inprocess(capsys, "report", folder, "--output", photo)
    assert code == 2 and "photo.png: exists and is not a report drawn by dpo-cli" in stderr and "--force" in stderr
    assert photo.read_bytes() == b"\x89PNG\r\n\x1a\n a holiday photo"

    (folder / "report.png").write_text("not ours")  # the default output, too
    code, _, stderr = run_cli_inprocess(capsys, "report", folder)
    assert code == 2 and "report.png: exists and is not a report" in stderr

    code, _, stderr = run_cli_inprocess(capsys, "report", folder, "--output", photo, "--force")
    assert code == 0, stderr
    assert photo.read_text().startswith("drawn: ")

    os.mkfifo(tmp_path / "pipe.png")  # never opened: reading it would block
    code, _, stderr = run_cli_inprocess(capsys, "report", folder, "--output", tmp_path / "pipe.png")
    assert code == 2 and "pipe.png: exists and is not a regular file" in stderr

    (tmp_path / "folder.png").mkdir()
    code, _, stderr = run_cli_inprocess(capsys, "report", folder, "--output", tmp_path / "folder.png", "--force")
    assert code == 2 and "folder.png: is a folder" in stderr


def test_report_replaces_a_symlink_never_its_target(tmp_path, capsys, checking_draw):
    folder = _run_folder(tmp_path, _metrics_text(), _recipe_text())
    target = tmp_path / "precious.png"
    target.write_bytes(b"precious")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    code, _, stderr = run_cli_inprocess(capsys, "report", folder, "--output", link)
    assert code == 0, stderr
    assert not link.is_symlink() and link.read_text().startswith("drawn: ")
    assert target.read_bytes() == b"precious"


def test_figures_without_the_marker_are_not_reports(tmp_path):
    """The same kind of figure saved without dpo-cli's marker (reports carry it: tests/run/test_report.py checks
    each format, test_nasty_folders_are_drawn_for_real a PNG)."""
    from matplotlib.figure import Figure
    from PIL import Image, PngImagePlugin

    plain = Figure(figsize=(1, 1))
    plain.subplots().plot([1, 2])
    for suffix in (".svg", ".pdf"):
        plain.savefig(tmp_path / f"plain{suffix}", metadata={"Title": "dpo-cli report"})
        assert not report.is_report_file(tmp_path / f"plain{suffix}"), suffix
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", "dpo-cli report")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png", pnginfo=info)
    assert not report.is_report_file(tmp_path / "plain.png")
    assert not report.is_report_file(tmp_path / "missing.png")


def test_pipes_devices_and_huge_files_in_a_run_folder_are_one_line(tmp_path, capsys, checking_draw):
    """Each would block, never end, or be read whole: refused before reading."""
    cases = []
    for name, make in [
        ("recipe.yaml", lambda path: os.mkfifo(path)),
        ("recipe.yaml", lambda path: path.symlink_to("/dev/zero")),
        ("recipe.yaml", lambda path: path.write_text("# " + "x" * (2 << 20) + "\n")),
        ("metrics.jsonl", lambda path: os.mkfifo(path)),
        ("metrics.jsonl", lambda path: path.symlink_to("/dev/zero")),
    ]:
        root = tmp_path / str(len(cases))
        root.mkdir()
        folder = _run_folder(root, _metrics_text(), _recipe_text())
        (folder / name).unlink()
        make(folder / name)
        code, _, stderr = run_cli_inprocess(capsys, "report", folder, "--output", root / "r.png")
        cases.append(stderr)
        assert code == 2 and len(stderr.splitlines()) == 1 and f"{name}: " in stderr, stderr
        assert "not a regular file" in stderr or "bytes, not a recipe" in stderr, stderr


def test_long_curves_are_thinned_to_each_slices_lowest_and_highest_point():
    """80,000 steps are drawn as 4,000 points: each of 2,000 slices keeps its lowest and highest, so a one-step
    spike is still drawn; by hand on 12 points in 3 slices of 4."""
    from array import array

    steps = array("q", range(1, 13))
    values = array("d", [5, 1, 9, 5, 5, 5, 5, 5, 2, 8, 5, 5])
    thinned_steps, thinned_values = report._thinned(steps, values, limit=6)
    assert list(thinned_steps) == [2, 3, 5, 9, 10] and list(thinned_values) == [1, 9, 5, 2, 8]
    assert report._thinned(steps, values, limit=12) == (steps, values)

    many = array("d", [0.0] * 80_000)
    many[12_345] = 100.0
    drawn_steps, drawn = report._thinned(array("q", range(80_000)), many)
    assert len(drawn) <= report.MAX_DRAWN_POINTS and max(drawn) == 100.0 and 12_345 in list(drawn_steps)


def test_long_train_and_eval_curves_are_both_thinned(tmp_path):
    from dpo_cli.run.run_folder import RunFolder

    records = [{"step": s, "loss": 1 / s, "eval_loss": 2 / s, "eval_rewards/accuracies": 0.5} for s in range(1, 5001)]
    run = RunFolder.from_records("long", tmp_path, records)
    axes = _CheckingAxes()
    report._draw_panel(axes, report.PANELS[0], [run])
    assert [len(steps) for steps, _ in axes.lines] == [4000, 4000]
