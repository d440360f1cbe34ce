"""Callbacks tests add to `dpo-cli train`'s own: they see the run through the same hooks a user's run calls."""

from __future__ import annotations

from dpo_cli.run import loop
from dpo_cli.run.callbacks import Callback


def add_callback(monkeypatch, callback: Callback) -> None:
    """Runs `callback` after the default callbacks in every `train` of this test (so after the checkpointer)."""
    defaults = loop.default_callbacks

    def with_callback(run, console, *more):
        return [*defaults(run, console, *more), callback]

    monkeypatch.setattr(loop, "default_callbacks", with_callback)


class InterruptBefore(Callback):
    """Ctrl-C as step `step` + 1 starts: the run's last complete step is `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, run) -> None:
        if run.state.step == self.step:
            raise KeyboardInterrupt
