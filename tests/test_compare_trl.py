"""compare_trl.py presets resolve to bench_train options that bench_train's own parser accepts."""

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
