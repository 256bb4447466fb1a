"""Ctrl-C (and SIGTERM) honoured from the first instant.

The handler both raises ``KeyboardInterrupt`` and remembers that it did: a library that
swallows the exception (an import interrupted half-way can end in an unrelated error) cannot
make the command carry on and publish an output or exit 0. :class:`staging.Stage` checks
before it publishes; the CLI's boundary turns any error after an interrupt into exit 130.
"""

from __future__ import annotations

import signal
from typing import Any

_interrupted = False


def _handler(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
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
