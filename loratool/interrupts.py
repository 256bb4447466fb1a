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
from types import FrameType
from typing import Any

_interrupted = False
_RETRY_S = 0.05


def _in_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    if _in_import(frame):
        # hold it back: send it again shortly, when the import may be over
        timer = threading.Timer(_RETRY_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT and SIGTERM as an interrupt (the main thread only, as Python requires)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def done() -> None:
    """The command has finished: ignore a late Ctrl-C while the interpreter shuts down (it
    would turn a complete, published result into a failed exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interrupted() -> bool:
    return _interrupted


def check_interrupted() -> None:
    """Raise KeyboardInterrupt when an interrupt arrived and was swallowed somewhere."""
    if _interrupted:
        raise KeyboardInterrupt
