"""The launcher's variables and the start of a job (run/distributed.py), without torchrun: a value that is not a
number or out of range is one line naming the variable; a peer that never comes is one line after the rendezvous
timeout, not a wait on the collectives' 2-hour one; Ctrl-C and SIGTERM end the wait with 130.

The torchrun runs themselves (every rank arrives) are tests/run/test_distributed.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli_inprocess

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DPO_CLI_RENDEZVOUS_TIMEOUT")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def launcher_env(monkeypatch):
    """Sets launcher variables for one test, starting from none of them."""
    for name in (*LAUNCHER_VARIABLES, "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def _train(untrained_tiny, out: Path) -> tuple:
    return ("train", "--model", untrained_tiny["model"], "--data", untrained_tiny["train"], "--output-dir", out)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number >= 1"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number >= 1"),
        ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2'"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' is not a whole number >= 0"),
        ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK='one'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 but WORLD_SIZE=2"),
        ({"RANK": "1"}, "RANK=1 but WORLD_SIZE=1"),  # a stray RANK alone would have made this run write nothing
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1'"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 but WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "port"}, "MASTER_PORT='port'"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "DPO_CLI_RENDEZVOUS_TIMEOUT": "soon"}, "'soon'"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "DPO_CLI_RENDEZVOUS_TIMEOUT": "0"}, "'0'"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "DPO_CLI_RENDEZVOUS_TIMEOUT": "nan"}, "'nan'"),
    ],
)
def test_a_launcher_variable_that_is_not_a_number_or_out_of_range_is_one_line(
    untrained_tiny, tmp_path, capsys, launcher_env, variables, named
):
    launcher_env(**variables)
    code, _, stderr = run_cli_inprocess(capsys, *_train(untrained_tiny, tmp_path / "run"))
    assert code == 2
    assert named in _one_error_line(stderr)
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_eval_under_a_broken_launcher_variable_is_one_line(untrained_tiny, tmp_path, capsys, launcher_env):
    launcher_env(WORLD_SIZE="many")
    adapter = tmp_path / "adapter"  # refused before it is read
    code, _, stderr = run_cli_inprocess(capsys, "eval", "--adapter", adapter, "--data", untrained_tiny["test"])
    assert code == 2 and "WORLD_SIZE='many'" in _one_error_line(stderr)


@pytest.mark.parametrize(
    ("rank", "message"),
    [
        ("0", "rank 0: rank 1 of this WORLD_SIZE=2 job never came to 127.0.0.1:"),
        ("1", "rank 1: nothing answered at 127.0.0.1:"),
    ],
    ids=["rank-0-waits-for-its-peer", "rank-1-waits-for-the-store"],
)
def test_a_peer_that_never_comes_is_one_line_after_the_rendezvous_timeout(
    untrained_tiny, tmp_path, capsys, launcher_env, rank, message
):
    launcher_env(WORLD_SIZE="2", RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    launcher_env(DPO_CLI_RENDEZVOUS_TIMEOUT="1")
    started = time.monotonic()
    code, _, stderr = run_cli_inprocess(capsys, *_train(untrained_tiny, tmp_path / "run"))
    assert code == 2
    line = _one_error_line(stderr)
    assert message in line and "within 1 s" in line and "DPO_CLI_RENDEZVOUS_TIMEOUT" in line, line
    assert time.monotonic() - started < 10
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_stray_launcher_environment_ends_on_sigterm_with_130_within_seconds(untrained_tiny, tmp_path):
    """The issue's case: WORLD_SIZE=2 RANK=0 and no peer waited on the 2-hour timeout, deaf to SIGTERM and SIGINT."""
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": "0"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "dpo_cli", *map(str, _train(untrained_tiny, out))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):  # rank 0 has opened the job's store: it is waiting for its peer
            assert run.poll() is None and time.monotonic() < deadline, "the run did not reach its rendezvous"
            time.sleep(0.05)
        time.sleep(0.5)
        peak_rss_mb = _peak_rss_mb(run.pid)
        run.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    assert time.monotonic() - sent < 10
    assert _one_error_line(stderr) == "error: interrupted"
    assert not out.exists()
    assert peak_rss_mb < 600, f"waiting for a peer costs what the imports cost ({peak_rss_mb:.0f} MB), no more"


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc: this test needs Linux")


def test_ctrl_c_ends_a_wait_for_a_store_that_never_opens_with_130(
    untrained_tiny, tmp_path, capsys, launcher_env, monkeypatch
):
    """Rank 1 of a job whose rank 0 never starts: Ctrl-C, sent while it is looking for the store, ends it."""
    from dpo_cli.run import distributed

    looking = threading.Event()
    look = distributed._accepts_connections

    def watched_look(host, port):
        looking.set()
        return look(host, port)

    def interrupt_once_looking():
        looking.wait(60)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(distributed, "_accepts_connections", watched_look)
    launcher_env(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    threading.Thread(target=interrupt_once_looking, daemon=True).start()
    started = time.monotonic()
    code, _, stderr = run_cli_inprocess(capsys, *_train(untrained_tiny, tmp_path / "run"))
    assert looking.is_set() and code == 130 and _one_error_line(stderr) == "error: interrupted"
    assert time.monotonic() - started < 10, "the default timeout is 300 s: only the signal ended the wait"
