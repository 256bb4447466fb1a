"""Pure torch math: the dense delta of a LoRA module in the base tensor's layout.

This module imports only torch. Formulas follow PEFT exactly (``(B @ A) * scale``, transposed
for fan_in_fan_out and embeddings), so that a merge computed from them is bit for bit PEFT's.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("linear", "fan_in_fan_out", "embedding", "conv")


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023). Example: lora_scale(16, 8)."""
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, layout: str) -> torch.Tensor:
    """ΔW for one module in the base weight's layout, computed in A's dtype.

    linear: (B@A)·s [out, in]; fan_in_fan_out and embedding: (B@A)ᵀ·s; conv:
    (B.view(out, r) @ A.view(r, -1)).view(out, in, *kernel)·s.
    """
    if layout == "conv":
        out, r = B.shape[0], B.shape[1]
        if B.dim() > 2 and math.prod(B.shape[2:]) != 1:
            raise ValueError("conv lora_B must have a 1×1 kernel")
        d = B.reshape(out, r) @ A.reshape(A.shape[0], -1)
        return (d * scale).reshape(out, *A.shape[1:])
    d = B @ A
    if layout in ("fan_in_fan_out", "embedding"):
        d = d.T
    return d * scale


def base_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layout: str
               ) -> tuple[int, ...]:
    """The shape of the base weight a module with these factor shapes applies to."""
    if layout == "conv":
        return (b_shape[0], *a_shape[1:])
    if layout in ("fan_in_fan_out", "embedding"):
        return (a_shape[1], b_shape[0])
    return (b_shape[0], a_shape[1])
