"""``loratool inspect``: what is in a checkpoint or adapter, from its headers alone; with
``against``, compared tensor by tensor with another (reads tensor data).

This verb stays free of torch: headers are all it reads, except for a PyTorch pickle (which
has no header: torch lists it) and ``against`` (which loads tensors); those two load their
modules only when asked for.

Example::

    report = inspect("model/")
    report.total_params, report.kind
"""

from __future__ import annotations

import os
from types import ModuleType

from ..headers.checkpoint import Checkpoint, PickleNeedsTorch, open_checkpoint
from ..headers.summary import summarize
from ..progress import SILENT, Progress
from ..reports.inspect import InspectReport


def _with_torch() -> ModuleType:
    """What needs torch (and loads it): listing a PyTorch pickle, which has no header, and
    comparing tensors."""
    from . import compare

    return compare


def open_headers(spec: str | os.PathLike[str], progress: Progress = SILENT) -> Checkpoint:
    """A checkpoint's headers; a PyTorch pickle, which has none, is listed by torch."""
    try:
        return open_checkpoint(spec, progress)
    except PickleNeedsTorch:
        return _with_torch().open_tensors(spec, progress)


def inspect(path: str | os.PathLike[str], *, filters: list[str] | None = None,
            against: str | os.PathLike[str] | None = None, progress: Progress = SILENT
            ) -> InspectReport:
    """What ``path`` holds (a local path or a Hub id), from its headers; with ``against``,
    every tensor the two share compared (``report.compare``).

    Example: ``inspect("adapter/").modules[0].rank``.
    """
    report = summarize(open_headers(path, progress), list(filters or []) or None)
    if against is not None:  # comparing reads tensors
        report.compare = _with_torch().compare_paths(path, against,
                                                     list(filters or []) or None, progress)
    return report
