"""compare_trl.py: presets resolve to options bench_train (or whole_process) accepts; a row per dpo-cli layout; the
run fails when dpo-cli's and TRL's losses disagree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_train  # noqa: E402
import compare_trl  # noqa: E402
import train_summary  # noqa: E402
import whole_process  # noqa: E402
from train_workers import WorkerResult  # noqa: E402


@pytest.mark.parametrize("preset", sorted(compare_trl.PRESETS))
def test_every_preset_dry_runs_and_parses(preset):
    out = subprocess.run(
        [sys.executable, str(BENCH / "compare_trl.py"), "--preset", preset, "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.startswith(f"preset {preset}: bench/bench_train.py --model")
    args = bench_train.parse_args(compare_trl.resolve(preset, []))
    assert args.batch_size == (1 if preset == "gpu-8b" else 8)


def test_extra_options_override_the_preset():
    args = bench_train.parse_args(compare_trl.resolve("cpu", ["--batch-size", "2"]))
    assert args.batch_size == 2


def test_the_cpu_preset_is_hh_at_512_with_a_row_per_layout():
    args = bench_train.parse_args(compare_trl.resolve("cpu", []))
    assert (args.data, args.model, args.max_length, args.batch_size) == ("hh", "stories260K", 512, 8)
    assert args.layouts == ["padded", "packed", "shared-prompt"]


def test_an_unknown_layout_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--layouts", "padded,sideways"])
    assert "--layouts: unknown 'sideways'" in capsys.readouterr().err


def test_whole_process_dry_run_resolves_to_options_it_parses():
    out = subprocess.run(
        [sys.executable, str(BENCH / "compare_trl.py"), "--whole-process", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.startswith("preset cpu: bench/whole_process.py --model stories260K --data hh")
    args = whole_process.parse_args(compare_trl.WHOLE_PROCESS["cpu"])
    assert (args.max_length, args.batch_size, args.steps, args.threads) == (512, 8, 12, 1)


def _result(tool: str, losses: list[float], layout: str = "") -> WorkerResult:
    return WorkerResult(
        tool=tool, step_ends=[], cpu_ends=[], load_average=[], tokens_per_step=[], pairs_per_step=[], digests=[],
        losses=losses, trainable_params=1, peak_step_mib=None, absolute_peak_mib=1.0, rss_before_training_mib=1.0,
        setup_seconds=0.0, layout=layout, auto_layout="shared-prompt" if layout else "",
    )  # fmt: skip


def test_losses_that_agree_pass():
    trl = [0.69314718, 0.68961328, 0.69585480]
    by_label = {
        "dpo-cli padded": [_result("dpo-cli", [0.69314718, 0.68969537, 0.69588140], "padded")],
        "trl": [_result("trl", trl)],
    }
    assert train_summary.loss_disagreements(by_label, 1e-4, 1e-3) == []
    first, later = train_summary.max_loss_gaps(by_label)["dpo-cli padded"]
    assert first == 0.0 and later == pytest.approx((0.68969537 - 0.68961328) / 0.68961328)


@pytest.mark.parametrize(
    ("ours", "step"),
    [
        ([0.6933, 0.6896, 0.6958], 1),  # step 1 off by 2.2e-4 relative
        ([0.69314718, 0.6904, 0.6958], 2),  # a later step off by 1.1e-3 relative
        ([0.69314718, float("nan"), 0.6958], 2),  # nan never agrees
    ],
)
def test_losses_that_disagree_name_the_row_and_step(ours, step):
    by_label = {
        "dpo-cli packed": [_result("dpo-cli", ours, "packed")],
        "trl": [_result("trl", [0.69314718, 0.68961328, 0.69585480])],
    }
    (problem,) = train_summary.loss_disagreements(by_label, 1e-4, 1e-3)
    assert problem.startswith(f"dpo-cli packed (run 1) step {step} loss "), problem


def test_a_missing_step_is_a_disagreement():
    by_label = {"dpo-cli padded": [_result("dpo-cli", [0.69], "padded")], "trl": [_result("trl", [0.69, 0.68])]}
    assert train_summary.loss_disagreements(by_label, 1e-4, 1e-3) == ["dpo-cli padded (run 1) logged 1 losses, TRL 2"]


def test_row_names_mark_the_default_layout_and_what_auto_ran():
    names = {
        ("dpo-cli shared-prompt", "shared-prompt"): "dpo-cli shared-prompt (default)",
        ("dpo-cli padded", "padded"): "dpo-cli padded",
        ("dpo-cli auto", "shared-prompt"): "dpo-cli auto (= shared-prompt)",
    }
    for (label, layout), expected in names.items():
        row = train_summary.Summary(
            "dpo-cli", layout, "shared-prompt", 1, 1, 1, 1, None, 1, None, 0.69, 0.69, 1
        )  # fmt: skip
        assert train_summary.row_name(label, row) == expected


def _run_compare(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "compare_trl.py"), *argv, "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


TINY = ["--preset", "cpu", "--model", "tiny", "--data", "tiny", "--max-length", "64", "--batch-size", "2"]
TINY += ["--steps", "2", "--warmup", "1", "--repeats", "1", "--layouts", "padded,shared-prompt"]


def test_tiny_end_to_end_prints_a_row_per_layout_and_fails_on_a_loss_gap(tmp_path):
    """dpo-cli (two layouts) and TRL on the demo tiny model, held to an impossible bound on the later steps' losses:
    the table still prints, a row and a ratio row per layout, then the run exits 1 with one line naming the row and
    step. At the default bounds the same results pass (~30 s)."""
    done = _run_compare([*TINY, "--later-loss-rtol", "1e-12", "--json", str(tmp_path / "out.json")], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].startswith(
        "dpo-cli's and TRL's losses disagree: dpo-cli padded (run 1) step 2 loss "
    ), done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in done.stdout.splitlines() if "|" in line}
    assert {"dpo-cli padded", "dpo-cli shared-prompt (default)", "TRL 1.16 DPOTrainer"} <= set(rows)
    assert {"**dpo-cli padded / TRL**", "**dpo-cli shared-prompt (default) / TRL**"} <= set(rows)
    assert rows["dpo-cli padded"] == rows["dpo-cli shared-prompt (default)"] == rows["TRL 1.16 DPOTrainer"]

    results = json.loads((tmp_path / "out.json").read_text())["results"]
    by_label = {label: [WorkerResult(**r) for r in runs] for label, runs in results.items()}
    assert [r.layout for r in by_label["dpo-cli shared-prompt"]] == ["shared-prompt"]
    assert train_summary.loss_disagreements(by_label, bench_train.LOSS_RTOL, bench_train.LATER_LOSS_RTOL) == []
