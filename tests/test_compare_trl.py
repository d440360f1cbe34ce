"""compare_trl.py presets resolve to bench_train options that bench_train's own parser accepts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_train  # noqa: E402
import compare_trl  # noqa: E402


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


def test_tiny_end_to_end_prints_one_table_with_ratios(tmp_path):
    """dpo-cli and TRL both run on the demo tiny model; their first-step losses must print identically."""
    argv = ["--preset", "cpu", "--model", "tiny", "--data", "tiny", "--max-length", "64", "--batch-size", "2"]
    argv += ["--steps", "2", "--warmup", "1", "--repeats", "1", "--workdir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(BENCH / "compare_trl.py"), *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    ).stdout
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in out.splitlines() if "|" in line}
    assert "dpo-cli / TRL" in " ".join(rows)
    assert rows["dpo-cli"].split(" ")[0] == rows["TRL 1.16 DPOTrainer"].split(" ")[0]
