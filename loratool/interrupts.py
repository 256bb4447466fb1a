"""Ctrl-C (and SIGTERM) honoured from the first instant.

The handler both raises ``KeyboardInterrupt`` and remembers that it did: a library that
swallows the exception (an import interrupted half-way can end in an unrelated error) cannot
make the command carry on and publish an output or exit 0. :class:`staging.Stage` checks
before it publishes; the CLI's boundary turns any error after an interrupt into exit 130.

An interrupt that lands inside an import is held back until the import is over: torch's
import runs Python code under C++ (pybind11) frames, and an exception raised there ends the
process with ``terminate`` (SIGABRT, a core dump) instead of exit 130. The signal is sent
again a moment later, and again, until it lands outside any import.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

_interrupted = False
_armed = True  # raise at once; before the command's error boundary is entered: hold it back
_held = 0  # depth of sections an interrupt must not cut (publishing, cleaning up)
_pending = False  # an interrupt arrived inside such a section
_RETRY_S = 0.05
_MAX_HOLD_S = 5.0  # an interrupt held back for want of a boundary is raised after this
_held_since: float | None = None


def _in_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _interrupted, _pending, _held_since
    _interrupted = True
    if _held:
        _pending = True  # raised when the section is over
        return
    now = time.monotonic()
    _held_since = _held_since or now
    if (not _armed or _in_import(frame)) and now - _held_since < _MAX_HOLD_S:
        # hold it back: send it again shortly, when the import may be over
        timer = threading.Timer(_RETRY_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    _held_since = None
    raise KeyboardInterrupt


def install(armed: bool = True) -> None:
    """Handle SIGINT and SIGTERM as an interrupt (the main thread only, as Python requires).
    ``armed=False``: remember an interrupt and raise it only once :func:`arm` is called (the
    command line installs the handler first thing, before its imports, and arms it inside its
    error boundary, so that no interrupt is raised where nothing catches it)."""
    global _armed
    _armed = armed
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def arm() -> None:
    """From now on an interrupt is raised (see :func:`install`)."""
    global _armed
    _armed = True


@contextmanager
def held(raise_after: bool = True) -> Iterator[None]:
    """A section an interrupt must not cut (renaming an output into place, removing a
    temporary one): an interrupt inside it is remembered and, with ``raise_after``, raised
    when the section is over (without it, the error boundary still sees it)."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and _pending and raise_after:
        _pending = False
        raise KeyboardInterrupt


def done() -> None:
    """The command has finished: ignore a late Ctrl-C while the interpreter shuts down (it
    would turn a complete, published result into a failed exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def reset() -> None:
    """Forget earlier interrupts: a new command starts (several run in one process in tests
    and scripts)."""
    global _interrupted, _pending, _held_since
    _interrupted = _pending = False
    _held_since = None


def interrupted() -> bool:
    return _interrupted


def check_interrupted() -> None:
    """Raise KeyboardInterrupt when an interrupt arrived and was swallowed somewhere."""
    if _interrupted:
        raise KeyboardInterrupt
