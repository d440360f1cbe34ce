"""Shared fixtures: offline hub, the built-in tiny model, ../shared material, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a slip that reaches for the hub fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DPO_CLI_SHARED", REPO.parent / "shared"))
STORIES_MODEL = SHARED / "models" / "stories260K"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session", autouse=True)
def prepared_data_cache(tmp_path_factory):
    """Prepared (tokenized) data goes to a throwaway folder, never the user's ~/.cache/dpo-cli."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPO_CLI_CACHE", str(tmp_path_factory.mktemp("prepared-data-cache")))
        yield


def require_shared(path: Path) -> Path:
    """Skip (saying what is missing) when ../shared is not beside the checkout, as in a lone clone."""
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared material), which is not present")
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict[str, Path]:
    """The built-in tiny Llama (briefly pretrained), its tokenizer, and train/test preference files."""
    from dpo_cli.tiny import build_demo

    return build_demo(tmp_path_factory.mktemp("tiny-demo"), pretrain_steps=60, train_pairs=200, test_pairs=40)


@pytest.fixture(scope="session")
def stories_model() -> Path:
    return require_shared(STORIES_MODEL)


@pytest.fixture(scope="session")
def stories_data() -> dict[str, Path]:
    root = require_shared(SHARED_DATA / "stories-happy")
    return {"train": root / "train.jsonl", "test": root / "test.jsonl"}


def run_cli_inprocess(capsys, *args: str) -> tuple[int, str, str]:
    """Run `dpo-cli ARGS` in this process (fast: no re-import of torch); returns (exit code, stdout, stderr)."""
    from dpo_cli.cli import main

    argv = sys.argv
    sys.argv = ["dpo-cli", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_subprocess(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m dpo_cli ARGS` as a user would: real exit code, real stderr (to check there is no traceback)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dpo_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
