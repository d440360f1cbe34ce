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
    from dpo_cli.demo.tiny import build_demo

    return build_demo(tmp_path_factory.mktemp("tiny-demo"), pretrain_steps=60, train_pairs=200, test_pairs=40)


@pytest.fixture(scope="session")
def untrained_tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama untrained (a second, not a minute): for tests that need a model folder and its tokenizer."""
    from dpo_cli.demo.tiny import build_demo

    return build_demo(tmp_path_factory.mktemp("untrained-tiny"), pretrain_steps=0, train_pairs=40, test_pairs=10)


def write_tiny_model_and_pairs(root: Path, pairs: int = 10) -> tuple[Path, Path]:
    """(a tiny Llama folder with its tokenizer, a file of `pairs` preference pairs) written under `root`."""
    from dpo_cli.demo.tiny import build_model, build_tokenizer, make_pairs, write_jsonl

    tokenizer = build_tokenizer(
        [p["prompt"] + c for p in make_pairs(100, seed=1) for c in (p["chosen"], p["rejected"])]
    )
    model = build_model(len(tokenizer), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", write_jsonl(root / "train.jsonl", make_pairs(pairs, seed=5))


@pytest.fixture(scope="session")
def stories_model() -> Path:
    return require_shared(STORIES_MODEL)


@pytest.fixture(scope="session")
def stories_data() -> dict[str, Path]:
    root = require_shared(SHARED_DATA / "stories-happy")
    return {"train": root / "train.jsonl", "test": root / "test.jsonl"}


def train_adapter(out: Path, model: Path, data: Path, max_steps: int, *extra: str) -> Path:
    """Run `dpo-cli train` in this process (from a session fixture, where capsys is not available)."""
    from typer.testing import CliRunner

    from dpo_cli.cli import app

    args = ["train", "--model", model, "--data", data, "--output-dir", out, "--max-steps", max_steps, *extra]
    args += ["--set", "training.save_steps=0", "--set", "model.gradient_checkpointing=false"]
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="session")
def stories_adapter(stories_model, stories_data, tmp_path_factory) -> Path:
    """An adapter `dpo-cli train` made on 4-bit stories260K and stories-happy (24 steps, about 20 s)."""
    out = tmp_path_factory.mktemp("stories-adapter") / "run"
    return train_adapter(
        out, stories_model, stories_data["train"], 24, "--batch-size", "8", "--lr", "2e-3", "--max-length", "128"
    )


@pytest.fixture(scope="session")
def tiny_adapter(tiny_demo, tmp_path_factory) -> Path:
    """An adapter `dpo-cli train` made on the 4-bit tiny demo model (8 steps, a few seconds)."""
    out = tmp_path_factory.mktemp("tiny-adapter") / "run"
    return train_adapter(out, tiny_demo["model"], tiny_demo["train"], 8, "--batch-size", "8", "--lr", "5e-3")


@pytest.fixture
def narrower_tiny_model(tiny_demo, tmp_path) -> Path:
    """A base that is not the tiny demo's: half its width, same tokenizer."""
    from transformers import AutoTokenizer

    from dpo_cli.demo.tiny import build_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_demo["model"])
    folder = tmp_path / "narrower"
    build_model(len(tokenizer), hidden_size=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
