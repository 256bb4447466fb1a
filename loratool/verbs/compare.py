"""``loratool inspect --against``: two checkpoints compared tensor by tensor (reads tensor
data), names, shapes, dtypes and ‖B − A‖/‖A‖.

Example::

    compare(open_checkpoint("base/"), open_checkpoint("tuned/")).changed
"""

from __future__ import annotations

import math
import os

import torch

from ..headers.checkpoint import Checkpoint
from ..io.tensors import open_checkpoint as open_tensors
from ..numerics import ops
from ..progress import SILENT, Progress
from ..reports.inspect import ChangedTensor, Comparison, DtypeMismatch, ShapeMismatch
from ..units import matches


def compare_paths(path: str | os.PathLike[str], against: str | os.PathLike[str],
                  filters: list[str] | None = None, progress: Progress = SILENT
                  ) -> Comparison:
    """``inspect PATH --against OTHER``: both opened with their tensors, then compared."""
    return compare(open_tensors(path, progress), open_tensors(against, progress), filters,
                   progress)


def compare(a: Checkpoint, b: Checkpoint, filters: list[str] | None = None,
            progress: Progress = SILENT) -> Comparison:
    """Compare two checkpoints tensor by tensor: names, shapes, dtypes and ‖B−A‖/‖A‖.

    Norms are accumulated in float64 over row chunks, so memory stays near one tensor.
    Example: ``compare(open_checkpoint(base), open_checkpoint(tuned)).unchanged``.
    """
    na = [n for n in a.tensors if matches(n, filters)]
    nb = [n for n in b.tensors if matches(n, filters)]
    sb = set(nb)
    sa = set(na)
    only_a = [n for n in na if n not in sb]
    only_b = [n for n in nb if n not in sa]
    shape_diff: list[ShapeMismatch] = []
    dtype_diff: list[DtypeMismatch] = []
    changed: list[ChangedTensor] = []
    unchanged = 0
    common = [n for n in na if n in sb]
    bar = progress.bar("compare", total=sum(a.tensors[n].nbytes for n in common), unit="B")
    for n in common:
        ia, ib = a.tensors[n], b.tensors[n]
        bar.update(ia.nbytes)
        if ia.shape != ib.shape:
            shape_diff.append(ShapeMismatch(n, list(ia.shape), list(ib.shape)))
            continue
        if ia.dtype != ib.dtype:
            dtype_diff.append(DtypeMismatch(n, ia.dtype, ib.dtype))
        ta, tb = a.load(n), b.load(n)
        if ia.dtype == ib.dtype and torch.equal(ta, tb):
            unchanged += 1
            continue
        ss_d, ss_a, max_abs = _diff_sums(ta, tb)
        if math.isnan(ss_d) and ia.dtype == ib.dtype and torch.equal(
                ta.isnan(), tb.isnan()) and torch.equal(ta.nan_to_num(0.0), tb.nan_to_num(0.0)):
            unchanged += 1  # the same values, NaN where the other has NaN
            continue
        if ss_d == 0.0 and ia.dtype != ib.dtype:
            unchanged += 1
            continue
        norm_a = math.sqrt(ss_a)
        # JSON has no inf or NaN: a zero base norm or NaN data gives null
        changed.append(ChangedTensor(
            n, list(ia.shape), _finite(math.sqrt(ss_d)), _finite(norm_a),
            _finite(math.sqrt(ss_d) / norm_a) if norm_a else None, _finite(max_abs)))
        del ta, tb
    bar.close()
    return Comparison(b.source, only_a, only_b, shape_diff, dtype_diff, changed, unchanged,
                      len(common))


def _diff_sums(ta: torch.Tensor, tb: torch.Tensor) -> tuple[float, float, float]:
    """Σ(b − a)², Σa² and max |b − a|, a chunk of 1M values at a time (in cache, one pass
    over each tensor), summed in float64 across chunks."""

    fa, fb = ta.reshape(-1), tb.reshape(-1)
    # bf16/fp16 values and their differences are exact in float32 (the fast path for the
    # checkpoints people compare); float32 data is compared in float64, as exactly as before
    half = (torch.bfloat16, torch.float16)
    work = torch.float32 if ta.dtype in half and tb.dtype in half else torch.float64
    ss_d = ss_a = max_abs = 0.0
    step = 1 << 20
    for s in range(0, fa.numel(), step):
        ca, cb = fa[s:s + step].to(work), fb[s:s + step].to(work)
        d = cb - ca  # (cb may be the loaded tensor itself: not in place)
        ss_d += _sum_squares(d)
        ss_a += _sum_squares(ca)
        lo, hi = torch.aminmax(d)
        max_abs = max(max_abs, -float(lo), float(hi))
    return ss_d, ss_a, max_abs


def _sum_squares(x: torch.Tensor) -> float:
    """Σx² of a 1-D chunk: norms of rows of 1024 values (short float32 sums, as
    ops.sum_squares), squared and summed in float64; one long float32 sum drifts by 1e-4."""

    if x.dtype == torch.float64:
        return float(torch.dot(x, x))
    n = x.numel() // 1024 * 1024
    head = ops.sum_squares(x[:n].view(-1, 1024)) if n else 0.0
    return head + float(torch.linalg.vector_norm(x[n:].double())) ** 2 if n < x.numel() \
        else head


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
