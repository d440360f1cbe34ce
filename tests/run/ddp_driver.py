"""What tests/run/test_distributed.py launches with torchrun: `dpo-cli train` runs, one after another, watched.

    python3 -m torch.distributed.run --nproc-per-node 2 tests/run/ddp_driver.py JOBS.json

JOBS.json is a list of jobs: {"args": [train arguments], "log": file, "bypass_wrapper": bool, "fail": {...},
"command": "train" (the default) or "sft"}. Each job is the real command line (`dpo_cli.cli.main`, so exit codes
and one-line errors are the user's), with one test callback added after the run's own: after every step each process
appends to `log.rank{R}` the SHA-256 of its adapter weights, and the pairs it trained on. `bypass_wrapper` makes the
policy pass skip the DDP wrapper (the trap the wrapper exists for), to show that the test catches it. `fail` makes
one rank meet a problem at a step: {"rank": R, "step": S, "kind": "user_error" | "nan"}. The driver exits with the
first job's non-zero exit code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from dpo_cli.errors import UserError
from dpo_cli.model.load import trainable_parameters
from dpo_cli.run import distributed, loop, objective, sharding
from dpo_cli.run.callbacks import Callback

BAD_RECORD = "train.jsonl:7: bad record (injected by the test on one rank)"


def adapter_hash(model) -> str:
    """Of the whole adapter (under --sharding fsdp every rank gathers it: a collective)."""
    digest = hashlib.sha256()
    for param in trainable_parameters(model):
        digest.update(sharding.full_tensor(param.detach()).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Watch(Callback):
    """Logs each step's adapter hash and pairs on this rank; bypasses the wrapper or fails a step when asked."""

    def __init__(self, job: dict):
        self.log = Path(f"{job['log']}.rank{distributed.rank()}")
        self.bypass = job.get("bypass_wrapper", False)
        self.fail = job.get("fail")
        self.pairs: list[list[int]] = []

    def on_loop_start(self, run) -> None:
        if self.bypass:
            run.scoring = dataclasses.replace(run.scoring, policy=None)
        self._write({"step": run.state.step, "adapter": adapter_hash(run.model), "start": True})

    def on_step_begin(self, run) -> None:
        self.pairs = loop.step_batches(run)
        fail = self.fail
        if fail and fail["rank"] == distributed.rank() and fail["step"] == run.state.step + 1:
            self._write({"step": run.state.step + 1, "failing": fail["kind"], "time": time.time()})
            if fail["kind"] == "user_error":
                raise UserError(BAD_RECORD)
            original = objective.score_batch  # what the DPO objective scores a micro-batch with

            def nan_losses(*args, **kwargs):
                scores = original(*args, **kwargs)
                return dataclasses.replace(scores, losses=scores.losses * float("nan"))

            objective.score_batch = nan_losses

    def on_step_end(self, run, record: dict) -> None:
        self._write({"step": run.state.step, "adapter": adapter_hash(run.model), "pairs": self.pairs})

    def _write(self, entry: dict) -> None:
        with self.log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


def run_job(job: dict) -> int:
    from dpo_cli.cli import main

    defaults = loop.default_callbacks
    loop.default_callbacks = lambda run, console, *more: [*defaults(run, console, *more), Watch(job)]
    sys.argv = ["dpo-cli", job.get("command", "train"), *map(str, job["args"])]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        loop.default_callbacks = defaults
    return 0


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        code = run_job(job)
        if code:
            sys.exit(code)
