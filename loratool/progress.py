"""Progress reporting, passed into the verbs: silent by default, drawn bars from the CLI.

A verb asks its ``Progress`` for a bar around each long step and updates it; it never decides
whether anything is shown. The command line passes :class:`TqdmProgress` when stderr is a
terminal and ``--quiet`` is not given, so bars are drawn exactly when a person is watching;
it also shows a status line (``status``) the moment a command starts, before torch is
imported, which the first bar or output takes away.

Example::
    with progress.bar("merge", total=nbytes, unit="B") as bar:
        for chunk in work:
            bar.update(len(chunk))
"""

from __future__ import annotations

import shutil
import sys
from typing import Iterator, Sequence, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Bar:
    """One progress bar; this base class draws nothing."""

    def update(self, n: float = 1) -> None:
        """Advance by ``n`` units."""

    def describe(self, desc: str) -> None:
        """Say what the current step is (a bar of few, long steps)."""

    def close(self) -> None:
        """Finish the bar (a drawn one is cleared)."""

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Where verbs report progress. This base class shows nothing (library use, tests,
    ``--quiet``, output that is not a terminal)."""

    #: huggingface_hub's own download bars follow this
    hub_bars = False

    def bar(self, desc: str, total: float | None = None, unit: str = "it") -> Bar:
        """A bar for one step; ``unit="B"`` shows bytes with SI prefixes."""
        return Bar()

    def status(self, text: str) -> None:
        """Say what is about to happen (a command's first line, before its imports and
        reads), until the first bar or any output takes its place."""

    def clear(self) -> None:
        """Take the status line away (before output is printed)."""

    def iterate(self, items: Sequence[T], desc: str, unit: str = "it") -> Iterator[T]:
        """The items, one bar step each."""
        with self.bar(desc, total=len(items), unit=unit) as bar:
            for x in items:
                yield x
                bar.update(1)


SILENT = Progress()


class _TqdmBar(Bar):
    def __init__(self, desc: str, total: float | None, unit: str) -> None:
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                         leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: float = 1) -> None:
        self._bar.update(n)

    def describe(self, desc: str) -> None:
        self._bar.set_description_str(desc)

    def close(self) -> None:
        self._bar.close()


class TqdmProgress(Progress):
    """Bars drawn by tqdm on stderr, cleared when each step ends; the status line is one
    line of the terminal's width (a wrapped line could not be taken back)."""

    hub_bars = True

    def __init__(self) -> None:
        self._status = False

    def bar(self, desc: str, total: float | None = None, unit: str = "it") -> Bar:
        self.clear()
        return _TqdmBar(desc, total, unit)

    def status(self, text: str) -> None:
        width = shutil.get_terminal_size().columns - 1
        if len(text) > width:
            text = text[: max(width - 1, 0)] + "…"
        sys.stderr.write("\r\x1b[K" + text)
        sys.stderr.flush()
        self._status = True

    def clear(self) -> None:
        if self._status:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._status = False
