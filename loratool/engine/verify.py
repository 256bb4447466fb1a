"""``--verify`` for merge and unmerge: the written output re-read and every changed tensor
checked against a float64 reference within a rigorous bound of float32 arithmetic and one
rounding to the output dtype.

Example: ``verify_output(base, Path("merged"), edits, +1.0, None)`` → the worst tensor
(a :class:`VerifyResult`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..engine import kernel
from ..engine.plan import Edit
from ..engine.record import UnmergeRecord
from ..errors import LoraToolError
from ..headers.checkpoint import Checkpoint
from ..headers.safetensors import dtype_bytes
from ..io.tensors import open_checkpoint
from ..numerics import ops
from ..progress import SILENT, Progress
from ..reports.merge import VerifyResult


def verify_output(base: Checkpoint, out: Path, edits: dict[str, Edit], sign: float,
                  record: UnmergeRecord | None, progress: Progress = SILENT) -> VerifyResult:
    """Re-read the output and check every changed tensor against a float64 reference.

    The bound per element is half an ulp of the output dtype at the reference value plus the
    float32 arithmetic error of the merge, ``(r + 3)·2⁻²⁴ · (|W| + Σ|w·s|·|B|@|A|)``. Reports
    the worst tensor (largest error / bound); a ratio above 1 is an error. A tensor that
    unmerge restored from the record must equal the record exactly. Tensors copied unchanged
    are scanned too: merge itself checks only what it computes.
    """

    merged = open_checkpoint(out)
    _all_finite(merged, edits, progress)
    worst = VerifyResult(name=None, ratio=0.0, max_abs_error=0.0, checked=len(edits), ok=True)
    with progress.bar("verify", total=len(edits), unit="tensor") as bar:
        for name, e in edits.items():
            bar.update(1)
            got = merged.load(name, dtype=torch.float64)
            if sign < 0 and e.full is not None:
                ref = record.load("replaced", name, dtype=torch.float64)  # type: ignore
                if not torch.equal(got, ref):
                    worst.name, worst.ratio = name, math.inf
                    worst.max_abs_error = float((got - ref).abs().max())
                    break
                continue
            W = base.load(e.source, dtype=torch.float64)
            if e.quant is not None:  # --qlora: the base as training dequantized it
                stored = base.load(e.source)
                W = kernel.faithful_base(stored.float(), e, stored.dtype, name).double()
            ref, bound_abs, r = _reference(W, e, sign, record, name)
            out_dtype = merged.load(name).dtype
            half_ulp = 2.0 ** -ops.mantissa_bits(out_dtype)
            tiny = torch.finfo(out_dtype).tiny
            # float32 error of an r-term dot product, the scale, the weight and the addition:
            # at most (r + 3)·u relative to the absolute-value sum (Higham's γ bound), u = 2⁻²⁴
            bound = half_ulp * ref.abs() + (r + 3) * 2.0 ** -24 * bound_abs + tiny
            err = (got - ref).abs()
            ratio = float((err / bound).max()) if err.numel() else 0.0
            if ratio > worst.ratio:
                worst.name, worst.ratio, worst.max_abs_error = name, ratio, float(err.max())
    worst.ok = worst.ratio <= 1.0
    if not worst.ok:
        raise LoraToolError(f"--verify: {worst.name} is off by {worst.max_abs_error:.3g}, "
                            f"{worst.ratio:.2f}× the rounding bound; the output is wrong "
                            "and was not written (please report this)")
    return worst


def _all_finite(merged: Checkpoint, edits: dict[str, Edit], progress: Progress) -> None:
    """No NaN or Inf in the tensors merge copied unchanged (they came from the base as they
    were: merge computes and checks only the ones it changes)."""

    copied = [n for n, i in merged.tensors.items() if n not in edits and i.dtype.startswith(
        ("F", "BF")) and dtype_bytes(i.dtype) > 1]
    with progress.bar("verify unchanged", total=len(copied), unit="tensor") as bar:
        for name in copied:
            bar.update(1)
            t = merged.load(name)
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise LoraToolError(f"--verify: {name} holds NaN or Inf, copied unchanged from "
                                    "the base: the base is damaged there; nothing was written")


def _reference(W: torch.Tensor, e: Edit, sign: float, record: UnmergeRecord | None,
               name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The float64 result of one edit, the absolute-value sum that bounds its float32
    rounding, and the largest rank involved."""

    if e.mult is not None:  # IA³, OFT, BOFT: their product (the rotation in float64 too)
        ref, bound_abs = e.mult.reference(W, sign)
        return ref, bound_abs, e.mult.error_terms
    bound_abs = W.abs()
    ref = W
    if e.full is not None:
        t, wt = e.full
        F = t.to(torch.float64)
        ref = F if F.shape != W.shape or wt == 1.0 else W + wt * (F - W)
        W = ref
        bound_abs = ref.abs()
    for m, wt in e.lora:
        d = m.delta(torch.float64) * wt
        ref = ref + sign * d
        bound_abs = bound_abs + abs(wt) * m.abs_delta()
    if e.dora is not None:
        m, wt = e.dora
        d = m.delta(torch.float64)
        if sign > 0:
            mg, _ = ops.dora_merge(W, d, m.magnitude.double(), m.layout)
            ref = mg if wt == 1.0 else W + wt * (mg - W)
        else:
            norm = record.load("dora_norm", name, dtype=torch.float64)  # type: ignore
            ref = ops.dora_unmerge(W, d, m.magnitude.double(), norm, m.layout)
        bound_abs = ref.abs() + W.abs() + m.abs_delta()
    for m, wt in e.bias:
        ref = ref + sign * wt * m.scale * m.bias.double()
        bound_abs = bound_abs + abs(wt * m.scale) * m.bias.double().abs()
    mods = [m for m, _ in e.lora] + ([e.dora[0]] if e.dora else [])
    r = max([getattr(m, "error_terms", m.rank) for m in mods] + [1])
    return ref, bound_abs, r
