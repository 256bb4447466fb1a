"""loratool: model surgery and LoRA adapter management, from Python as from the shell.

Every command of the command line is a function here, with the same options as keyword
arguments, returning the typed report the command prints (``report.render()`` is its text,
``report.to_json()`` its ``--json``), and raising :class:`LoraToolError` (nothing written)
where the command would exit 1.

Example::

    import loratool

    for name in ["style", "task", "chat"]:
        r = loratool.merge("base/", [f"adapters/{name}"], f"merged-{name}/", dtype="bf16")
        print(name, r.tensors_changed, f"{r.seconds:.1f} s")

    policy = loratool.RankPolicy.from_options(rank=None, energy=0.9, max_error=None,
                                              budget=None)
    report = loratool.extract("base/", "tuned/", "adapter/", policy=policy)
    print(report.totals.max_rel_error)

``import loratool`` imports no torch: each verb's module (and torch, where the verb needs it)
loads when the verb is first used, so ``loratool.inspect`` stays header-only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .about import __version__
from .errors import (
    FormatError,
    HubError,
    InputError,
    LoraToolError,
    OutputError,
    UnsafeFileError,
    UsageError,
)
from .options import Options, RankPolicy

# public name → the module that defines it, imported on first use (progress too: tqdm's import
# is most of this package's, and the command line installs its Ctrl-C handler only after the
# package is imported, so what runs before that must be short)
_LAZY = {
    "Progress": "progress", "TqdmProgress": "progress", "SILENT": "progress",
    "inspect": "verbs.inspect", "extract": "verbs.extract", "merge": "verbs.merge",
    "unmerge": "verbs.merge", "combine": "verbs.combine", "resize": "verbs.combine",
    "convert": "verbs.convert", "analyze": "verbs.analyze", "export": "verbs.export",
    "pull": "verbs.hub", "push": "verbs.hub",
    "Report": "reports.base",
    "InspectReport": "reports.inspect", "Comparison": "reports.inspect",
    "ExtractReport": "reports.extract",
    "MergeReport": "reports.merge", "GgufMergeReport": "reports.merge",
    "PipelineMergeReport": "reports.merge",
    "CombineReport": "reports.combine", "ConvertReport": "reports.convert",
    "FinetuneAnalysis": "reports.analyze", "AdapterAnalysis": "reports.analyze",
    "CompareAnalysis": "reports.analyze",
    "ExportReport": "reports.export",
    "PullReport": "reports.hub", "PushReport": "reports.hub",
}

__all__ = ["__version__", "LoraToolError", "UsageError", "InputError", "FormatError",
           "UnsafeFileError", "OutputError", "HubError", "Options", "RankPolicy", *_LAZY]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loratool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and editors see: the same names, eagerly
    from .progress import SILENT, Progress, TqdmProgress
    from .reports.analyze import AdapterAnalysis, CompareAnalysis, FinetuneAnalysis
    from .reports.base import Report
    from .reports.combine import CombineReport
    from .reports.convert import ConvertReport
    from .reports.export import ExportReport
    from .reports.extract import ExtractReport
    from .reports.hub import PullReport, PushReport
    from .reports.inspect import Comparison, InspectReport
    from .reports.merge import GgufMergeReport, MergeReport, PipelineMergeReport
    from .verbs.analyze import analyze
    from .verbs.combine import combine, resize
    from .verbs.convert import convert
    from .verbs.export import export
    from .verbs.extract import extract
    from .verbs.hub import pull, push
    from .verbs.inspect import inspect
    from .verbs.merge import merge, unmerge
