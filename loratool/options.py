"""Options several commands share: devices, output dtypes, adapter weights."""

from __future__ import annotations

import math
from typing import Any

from .errors import LoraToolError

DTYPES = {"keep": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def resolve_device(device: str) -> Any:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without one is a clear error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LoraToolError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraToolError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LoraToolError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    return dev


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    """One finite --weight per adapter, or none (all 1)."""
    weights = list(weights or [])
    if weights and len(weights) != n:
        raise LoraToolError(f"{len(weights)} --weight for {n} adapters; give one per adapter, "
                            "in order, or none")
    if not all(math.isfinite(w) for w in weights):
        raise LoraToolError("--weight must be a finite number")
    return weights or [1.0] * n


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LoraToolError(f"unknown --dtype {dtype}; use keep, fp32, bf16 or fp16")
