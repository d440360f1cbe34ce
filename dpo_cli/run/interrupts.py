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
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: str | None = None
_deferred = False


def _handler(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name
    if not _deferred:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a signal is only remembered, and the caller stops where `received()` says so. A sharded run's
    processes must all stop at the same step: saving its checkpoint gathers the adapter from every one of them,
    which an interrupt raised at a different point in each would leave waiting for one another."""
    global _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = False


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


def received() -> str | None:
    """The name of the signal that interrupted this command (SIGINT, SIGTERM), or None."""
    return _received


def raise_if_received() -> None:
    """Re-raise an interrupt that something along the way swallowed."""
    if _received is not None:
        raise KeyboardInterrupt
