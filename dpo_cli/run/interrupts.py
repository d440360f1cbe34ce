"""Ctrl-C and SIGTERM end a command the same way, whenever they arrive: a checkpoint if training, then exit 130.

Python turns SIGINT into KeyboardInterrupt, but libraries can swallow it: an import that catches the exception
and re-raises another (transformers' lazy modules turn it into ModuleNotFoundError), or code with a broad
`except`. And SIGTERM, what schedulers send to preempt a job, by default kills the process with no cleanup at all.
So both signals go through one handler that *remembers* the signal before raising KeyboardInterrupt: whatever
becomes of the exception, `received()` still knows, and the command line ends with 130 instead of a traceback or
a finished-looking exit 0.

The handler is installed even where SIGINT arrives ignored: a non-interactive shell starts its background jobs
with SIGINT ignored, and a `kill -INT` (or Ctrl-C at a script running `dpo-cli train &`) then did nothing at all
and the run went on to exit 0. Someone who sends the signal means it.

Only the first signal of a command raises: a second one (Ctrl-C pressed twice, a scheduler's repeated SIGTERM) is
remembered, so it cannot cut short the checkpoint the first one asked for. Inside `held()` (a run's last outputs)
no signal raises: the outputs are finished, then the caller ends with 130. Once the command has ended, `ignore()`
keeps a late signal from killing the process during the interpreter's teardown (it would turn 130 into 143: Python
puts the default handlers back before it frees its modules).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: str | None = None
_holding = False


def _handler(signum, frame) -> None:
    global _received
    first = _received is None
    _received = _received or signal.Signals(signum).name
    if first and not _holding:
        raise KeyboardInterrupt


def install() -> dict:
    """Route SIGINT and SIGTERM to the remembering handler; returns the previous handlers for `restore`."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    return previous


def restore(previous: dict) -> None:
    """Put the previous handlers back and forget the signal: the command that received it is over."""
    global _received
    _received = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A block that no signal interrupts: a signal is remembered (see `received`), and the block runs to its end.
    For short work that must not be left half done (a finished run's outputs); the caller then checks `received`."""
    global _holding
    raise_if_received()
    before, _holding = _holding, True
    try:
        yield
    finally:
        _holding = before


def ignore() -> None:
    """From now on SIGINT and SIGTERM do nothing: the command is over and its exit code decided."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def received() -> str | None:
    """The name of the signal that interrupted this command (SIGINT, SIGTERM), or None."""
    return _received


def raise_if_received() -> None:
    """Re-raise an interrupt that something along the way swallowed."""
    if _received is not None:
        raise KeyboardInterrupt
