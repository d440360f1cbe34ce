"""Ctrl-C or SIGTERM in the first moments of `python -m dpo_cli`: 130 and one line once our code runs, never a
traceback from it. (Before __main__ runs, during Python's own start-up, the interrupt is Python's to report.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

OUR_FRAME = re.compile(r'File "[^"]*[/\\]dpo_cli[/\\]')
DELAYS = [0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.3, 0.45]


def test_an_interrupt_right_after_start_never_shows_our_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    outcomes = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        for delay in DELAYS:
            child = subprocess.Popen(
                [sys.executable, "-m", "dpo_cli", "report", tmp_path / "missing"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            time.sleep(delay)
            child.send_signal(sig)
            _, stderr = child.communicate(timeout=120)
            where = f"{sig.name} after {delay} s: exit {child.returncode}\n{stderr[-2000:]}"
            assert not OUR_FRAME.search(stderr), where
            if child.returncode == 130:
                assert stderr == "error: interrupted\n", where
            elif child.returncode == 2:  # done before the signal came
                assert "missing: not a folder" in stderr, where
            else:  # Python's start-up, before dpo_cli's code: killed by the signal, or Python's own message
                assert child.returncode in (-sig, 1), where
                assert not stderr.startswith("error:"), where
            outcomes.append(child.returncode)
    assert outcomes.count(130) >= 2, f"the handler was never reached: {outcomes}"
