"""Options several commands share: devices, output dtypes, adapter weights."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Iterator

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


def streaming_threads_count() -> int:
    """Half the cores this process may run on, at most 4 (``OMP_NUM_THREADS`` wins)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


@contextmanager
def streaming_threads() -> Iterator[None]:
    """torch's intra-op threads while a merge streams, restored after.

    A merge is many short memory-bound operations per tensor. With a thread per core, each
    one waits at its end for the slowest thread, and a core shared with any other busy
    process makes that wait a scheduler time slice: a merge beside one busy process took
    1.9× its idle time with two threads on two cores, 1.1× with one, and one thread is as
    fast when idle (reads and writes run in their own threads anyway)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(streaming_threads_count())
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
