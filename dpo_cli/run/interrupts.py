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

import signal  # and nothing slower: __main__ installs the handler with this module before any other import

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: str | None = None
_quiet = False  # inside held() or deferred(): a signal is remembered, not raised


def _handler(signum, frame) -> None:
    global _received
    first = _received is None
    _received = _received or signal.Signals(signum).name
    if first and not _quiet:
        raise KeyboardInterrupt


def install() -> dict:
    """Route SIGINT and SIGTERM to the remembering handler; returns the previous handlers for `restore`."""
    global _received
    _received = None
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
    except ValueError:  # not the main thread: only it can set handlers (and it receives the signals)
        return {}
    return previous


def restore(previous: dict) -> None:
    """Put the previous handlers back and forget the signal: the command that received it is over."""
    global _received
    _received = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _Quiet:
    """A block in which a signal is only remembered (see `received`), not raised. (A class, not a contextlib
    generator: this module imports nothing but `signal`, see __main__.)"""

    def __init__(self, stop_if_received: bool):
        self.stop_if_received = stop_if_received

    def __enter__(self) -> None:
        global _quiet
        if self.stop_if_received:
            raise_if_received()
        self._before, _quiet = _quiet, True

    def __exit__(self, *exc) -> None:
        global _quiet
        _quiet = self._before


def held() -> _Quiet:
    """A block that no signal interrupts: a signal is remembered (see `received`), and the block runs to its end.
    For short work that must not be left half done (a finished run's outputs); the caller then checks `received`."""
    return _Quiet(stop_if_received=True)


def deferred() -> _Quiet:
    """Inside, a signal is only remembered, and the caller stops where `received()` says so. A sharded run's
    processes must all stop at the same step: saving its checkpoint gathers the adapter from every one of them,
    which an interrupt raised at a different point in each would leave waiting for one another."""
    return _Quiet(stop_if_received=False)


def ignore() -> None:
    """From now on SIGINT and SIGTERM do nothing: the command is over and its exit code decided."""
    try:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def received() -> str | None:
    """The name of the signal that interrupted this command (SIGINT, SIGTERM), or None."""
    return _received


def raise_if_received() -> None:
    """Re-raise an interrupt that something along the way swallowed."""
    if _received is not None:
        raise KeyboardInterrupt


def exit_interrupted() -> None:
    """End the command for an interrupt: one line, exit 130.

    CPython 3.11 notes a KeyboardInterrupt that escapes code run by `exec` of a string (dataclasses build their
    methods that way, at import) and at exit kills the process with SIGINT, whatever exit code was chosen after
    catching it. Running one more string through `exec` clears that note.
    """
    import sys

    exec("pass")
    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130)
