"""Progress reporting, passed into the verbs: silent by default, drawn bars from the CLI.

A verb asks its ``Progress`` for a bar around each long step and updates it; it never decides
whether anything is shown. ``cli.py`` passes :class:`TqdmProgress` when stderr is a terminal
and ``--quiet`` is not given, so bars are drawn exactly when a person is watching.

Example::
    with progress.bar("merge", total=nbytes, unit="B") as bar:
        for chunk in work:
            bar.update(len(chunk))
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Bar:
    """One progress bar; this base class draws nothing."""

    def update(self, n: float = 1) -> None:
        """Advance by ``n`` units."""

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

    def close(self) -> None:
        self._bar.close()


class TqdmProgress(Progress):
    """Bars drawn by tqdm on stderr, cleared when each step ends."""

    hub_bars = True

    def bar(self, desc: str, total: float | None = None, unit: str = "it") -> Bar:
        return _TqdmBar(desc, total, unit)
