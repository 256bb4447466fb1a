"""What every merge path shares: the adapters as read (:class:`Part`), how the merge runs
(:class:`MergeSettings`, one object instead of a dozen parameters passed from path to path),
and the peak memory a report gives.

Example::

    settings = MergeSettings(sign=1.0, device=torch.device("cpu"))
    parts = [Part(read_any("adapter/"), 1.0, "adapter/")]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.adapter import LoraAdapter
from ..options import Options
from ..progress import SILENT, Progress
from ..reports.merge import AdapterWeight
from .merge_qlora import QloraPlan

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover  (Windows)
    resource = None  # type: ignore[assignment]


@dataclass
class Part:
    """One adapter of a merge: as read, its weight, and how the user named it."""

    adapter: LoraAdapter
    weight: float
    spec: str


def named(parts: list[Part]) -> list[AdapterWeight]:
    """The adapters as a report lists them."""
    return [AdapterWeight(p.spec, p.weight) for p in parts]


@dataclass(frozen=True)
class MergeSettings:
    """How one merge or unmerge runs, the same for a model folder, a GGUF file and each
    component of a pipeline.

    ``sign``: +1 merges, −1 unmerges. ``dtype``: keep, fp32, bf16 or fp16 (float tensors).
    ``record``: write what unmerge needs beside the output; ``exact``: with it, the values
    (W + ΔW) − ΔW does not give back, so that unmerge is exact. ``quant``: a GGUF output type;
    ``imatrix``: the importance matrix its K-quants are quantized with. ``qlora``: the tensors
    to merge into as bitsandbytes' dequantize(quantize(W)).
    """

    sign: float
    device: torch.device
    dtype: str = "keep"
    max_shard_size: str | int = "5GB"
    force: bool = False
    untie: bool = False
    verify: bool = False
    record: bool = True
    exact: bool = True
    quant: str | None = None
    imatrix: str | None = None  # a llama.cpp importance matrix for the re-quantized tensors
    options: Options = field(default_factory=Options)
    progress: Progress = SILENT
    qlora: QloraPlan | None = None

    @property
    def operation(self) -> str:
        return "merge" if self.sign > 0 else "unmerge"


def existing(paths: list[str]) -> list[Path]:
    """The inputs that are local paths (an output may never replace one)."""
    return [Path(p) for p in paths if Path(p).exists()]


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where the OS does not say)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS
