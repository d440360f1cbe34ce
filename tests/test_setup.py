"""The Makefile's virtualenv step: one clear line when it cannot make one, and never touching what it did not make.

The full fresh-machine path (`make demo`, `make test` from a clone with PIP_REQUIRE_VIRTUALENV=1) takes minutes and
a package index, so CI runs it (`.ci/run`); these tests check the refusals, which need neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make on the PATH")


# A `make VENV=... test` running these tests hands its variables down, through MAKEFLAGS and the environment.
INHERITED = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "VENV", "PYTHON", "TORCH")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in INHERITED}
    return {**env, **extra}


def _make(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        env=_clean_env(**env),
        timeout=60,
    )


def _python_without_ensurepip(folder: Path) -> Path:
    """A python like Debian's without python3-venv: `import ensurepip` fails."""
    shadow = folder / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ensurepip is not installed')\n")
    python = folder / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{shadow.parent}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python


def test_missing_venv_module_is_one_line_and_creates_nothing(tmp_path):
    python = _python_without_ensurepip(tmp_path)
    venv = tmp_path / "venv"
    result = _make("venv", f"PYTHON={python}", f"VENV={venv}")
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert error_lines == [f"error: {python} -m venv is missing; install it with: apt install python3-venv"]
    assert not venv.exists()


def test_a_folder_that_is_not_a_virtualenv_is_left_alone(tmp_path):
    folder = tmp_path / "not-a-venv"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine\n")
    result = _make("venv", f"VENV={folder}")
    assert result.returncode != 0
    assert f"error: {folder} exists but is not a virtualenv" in result.stderr
    assert [path.name for path in folder.iterdir()] == ["mine.txt"]


def test_the_active_virtualenv_is_used_when_there_is_one(tmp_path):
    venv = tmp_path / "active"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / ".dpo-cli-installed").touch()  # pretend installed: only the command line is checked (dry run)
    result = _make("-n", "test", VIRTUAL_ENV=str(venv))
    assert result.returncode == 0, result.stderr
    assert f"{venv}/bin/python -m pytest -q" in result.stdout
