"""The merge kernel: W ± Σ wᵢ·sᵢ·ΔWᵢ for one tensor, in PEFT's order of operations, and the
one guard on what it computes; for a multiplicative tuner (IA³, OFT, BOFT) its own product
(W·l, R·W …) and its inverse. Every merge path runs through here: a safetensors model a
block of rows at a time, a GGUF model a block of dequantized rows at a time, the in-memory and
streamed ONNX exports and unmerge's check whole.

PEFT merges ``W + (B @ A) * scale``: the product of the whole matrices, then the scale. The
products here are of the whole matrices too (:func:`products`: the same matrix kernel, so
the same bits, whatever block of rows is then added), scaled and weighted a block of rows at a
time (:func:`add_rows`: elementwise, so blocking changes no bit) while the block is in cache.

Example::
    prods = products(edit, torch.device("cpu"))
    W = base_rows.to(torch.float32)
    add_rows(W, prods, slice(0, len(W)), +1.0, stats)
    guard(W, torch.bfloat16, name)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError, LoraToolError
from ..io.tensors import Buffers
from ..model.adapter import LoraModule
from ..numerics import ops
from ..numerics.nf4 import roundtrip
from .plan import Edit
from .record import RECORD, UnmergeRecord


@dataclass
class Stats:
    """What the kernel saw: the largest |w·s·ΔW| added to any value; with a QLoRA base,
    ‖W‖, ‖Wq − W‖ (Wq = dequantize(quantize(W))) and ‖ΔW‖ (what the adapters added to Wq)."""

    max_abs_delta: float = 0.0
    quant_norms: tuple[float, float, float] | None = None


@dataclass
class Product:
    """One module's B@A over a whole tensor (unscaled for LoRA, in the base tensor's layout),
    with the scale and weight still to apply."""

    delta: torch.Tensor
    scale: float
    weight: float


def products(edit: Edit, device: torch.device, bufs: Buffers | None = None) -> list[Product]:
    """The B@A of every module on one tensor, computed whole (PEFT's matrix product, so its
    bits), into reused buffers on the CPU. LyCORIS modules give their ΔW as LyCORIS computes
    it, scale included."""
    out = []
    for k, (m, w) in enumerate(edit.lora):
        if isinstance(m, LoraModule):
            A, B = m.A.to(device, torch.float32), m.B.to(device, torch.float32)
            n = math.prod(m.base_shape)
            buf = bufs.get(f"delta{k}", torch.float32, n) if bufs is not None and \
                device.type == "cpu" and not m.experts else None
            d = ops.lora_delta(A, B, 1.0, m.layout, out=buf, scaled=False)
            out.append(Product(d, m.scale, w))
        else:
            out.append(Product(m.delta(torch.float32, device), 1.0, w))
    return out


def add_rows(W: torch.Tensor, prods: list[Product], rows: slice, sign: float, stats: Stats
             ) -> None:
    """``W`` (float32, the caller's copy of these rows of the tensor) ± Σ w·s·ΔW[rows], in
    place, in PEFT's order: the product times the scale, times the weight, added. Each
    block of rows is visited once (the scale is applied in place on the product)."""
    for p in prods:
        dc = p.delta[rows]
        if p.scale != 1.0:
            dc.mul_(p.scale)
        if p.weight != 1.0:
            dc.mul_(p.weight)
        if dc.numel():
            lo, hi = torch.aminmax(dc)
            stats.max_abs_delta = max(stats.max_abs_delta, -float(lo), float(hi))
        if sign > 0:
            W.add_(dc)
        else:
            W.sub_(dc)


def guard(W: torch.Tensor, out_dtype: torch.dtype | None, name: str) -> None:
    """What the kernel computed must be finite and fit the output dtype: ``aminmax``
    propagates NaN, so finite extremes mean every value is finite. Else nothing is written."""
    if not W.numel() or not W.is_floating_point():
        return
    lo, hi = (float(x) for x in torch.aminmax(W))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise LoraToolError(f"{name}: the result holds NaN or Inf; nothing was written (check "
                            "the base, the adapter's values and --weight)")
    if out_dtype in (torch.float16, torch.bfloat16):
        big = max(-lo, hi)
        limit = torch.finfo(out_dtype).max
        if big > limit:
            raise LoraToolError(f"{name}: a value of {big:.4g} exceeds the largest "
                                f"{str(out_dtype).removeprefix('torch.')} ({limit:.4g}); "
                                "write with --dtype fp32 or bf16")


def is_rows_only(edit: Edit) -> bool:
    """Whether an edit is additions only (no full replacement, DoRA or bias), which can run a
    block of rows at a time."""
    return (edit.full is None and edit.dora is None and not edit.bias and edit.mult is None
            and edit.quant is None)


def faithful_base(W: torch.Tensor, edit: Edit, dtype: torch.dtype, name: str = ""
                  ) -> torch.Tensor:
    """``W`` (float32, the stored tensor of ``dtype``) as the QLoRA model computed with it:
    bitsandbytes' dequantize(quantize(W)) in the dtype training loaded it in, as float32;
    ``W`` itself without ``edit.quant``."""
    if edit.quant is None:
        return W
    fmt, transposed = edit.quant
    return roundtrip(W.to(dtype), fmt, transposed, name).to(torch.float32)


def merged(W: torch.Tensor, edit: Edit, sign: float, device: torch.device,
           norms: dict[str, torch.Tensor] | None = None, name: str = "",
           record: UnmergeRecord | None = None, stats: Stats | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The merged (sign +1) or unmerged (sign −1) float32 tensor, whole, on ``device``; ``W``
    is the caller's own float32 copy and may be changed in place. A full replacement first,
    or the QLoRA base (``edit.quant``: ``W`` was stored as ``dtype``), then the additions (the
    same kernel as the row blocks), then DoRA, then the biases. ``norms`` receives the DoRA
    row norms a merge computes. Full replacements are undone by unmerge's restore from the
    record, not here."""
    stats = Stats() if stats is None else stats
    if edit.quant is not None:
        Wq = faithful_base(W, edit, dtype or W.dtype, name)
        base_norm, quant_norm = float(W.norm()), float((Wq - W).norm())
        W = Wq.clone()  # Wq is kept to measure what the adapters add
    if edit.mult is not None:  # planned alone on its tensor: nothing else changes it
        new = edit.mult.apply(W, sign)
        if new.numel():
            stats.max_abs_delta = max(stats.max_abs_delta, float((new - W).abs().max()))
        if edit.quant is not None:
            stats.quant_norms = (base_norm, quant_norm, float((new - Wq).norm()))
        return new
    if edit.full is not None:
        t, w = edit.full
        F = t.to(device=device, dtype=torch.float32, copy=True)  # W is changed in place
        if F.shape != W.shape:
            if w != 1.0:
                raise FormatError(f"{name}: a resized full tensor cannot be weighted")
            W = F
        else:
            W = F if w == 1.0 else W + w * (F - W)
    add_rows(W, products(edit, device), slice(None), sign, stats)
    if edit.quant is not None:
        stats.quant_norms = (base_norm, quant_norm, float((W - Wq).norm()))
        del Wq
    if edit.dora is not None:
        W = _dora(W, edit, sign, device, norms if norms is not None else {}, name, record,
                  stats)
    for m, w in edit.bias:
        b = m.bias.to(device, torch.float32) * m.scale
        if w != 1.0:
            b = b * w
        W.add_(b) if sign > 0 else W.sub_(b)
    return W


def _dora(W: torch.Tensor, edit: Edit, sign: float, device: torch.device,
          norms: dict[str, torch.Tensor], name: str, record: UnmergeRecord | None,
          stats: Stats) -> torch.Tensor:
    """PEFT's DoRA merge (W' = m/‖W + ΔW‖ · (W + ΔW)), or its undoing with the recorded
    row norms."""
    assert edit.dora is not None
    m, w = edit.dora
    d = m.delta(torch.float32, device)
    mag = m.magnitude.to(device, torch.float32)
    stats.max_abs_delta = max(stats.max_abs_delta, float(d.abs().max()))
    if sign > 0:
        dora_merged, norm = ops.dora_merge(W, d, mag, m.layout)
        norms[name] = norm.cpu()
        return dora_merged if w == 1.0 else W + w * (dora_merged - W)
    norm = record.load("dora_norm", name) if record is not None else None
    if norm is None:
        raise FormatError(f"{name}: DoRA cannot be undone from merged weights alone (the row "
                          f"norms are lost) and the merged folder has no {RECORD} with them: "
                          "merge with `loratool merge`, which records them, then unmerge "
                          "that output")
    if w != 1.0:
        raise FormatError(f"{name}: unmerging a weighted DoRA merge is not supported")
    return ops.dora_unmerge(W, d, mag, norm.to(device, torch.float32), m.layout)
