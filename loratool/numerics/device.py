"""Where the math runs: the device a ``--device`` names, and torch's threads while a merge
streams.

Example::
    dev = resolve_device("auto")            # cuda when torch sees a GPU, else cpu
    with streaming_threads(Options()):
        ...
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import LoraToolError
from ..options import Options


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without one is a clear error."""
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


def _given_threads(options: Options | None) -> int | None:
    """The thread count the user gave: ``options.threads``, else ``OMP_NUM_THREADS``."""
    if options is not None and options.threads is not None:
        return max(1, options.threads)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return None


def streaming_threads_count(options: Options | None = None) -> int:
    """``options.threads`` when set; else half the cores this process may run on, at most 4
    (``OMP_NUM_THREADS`` wins)."""
    given = _given_threads(options)
    return given if given is not None else max(1, min(4, _cores() // 2))


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def quant_workers_count(options: Options | None = None) -> int:
    """Threads that quantize K-quant blocks side by side while a merge streams:
    ``options.threads`` or ``OMP_NUM_THREADS`` when set; else as many as torch's streaming
    threads, and more where that leaves cores idle (one per core each running that many).

    Unlike torch's threads inside one operation, these workers never wait for each other
    (each quantizes a block of its own), so a busy core costs only its own block: on 2 cores
    a Q4_K_M merge took 9.5-10.1 s with two workers against 13.2-15.0 s with one, and beside
    a busy process 11.8-13.2 s against 14.0-15.5 s."""
    given = _given_threads(options)
    if given is not None:
        return given
    streaming = streaming_threads_count(options)
    return max(streaming, _cores() // streaming)


@contextmanager
def streaming_threads(options: Options | None = None) -> Iterator[None]:
    """torch's intra-op threads while a merge streams, restored after.

    A merge is many short memory-bound operations per tensor. With a thread per core, each
    one waits at its end for the slowest thread, and a core shared with any other busy
    process makes that wait a scheduler time slice: a merge beside one busy process took
    1.9× its idle time with two threads on two cores, 1.1× with one, and one thread is as
    fast when idle (reads and writes run in their own threads anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(streaming_threads_count(options))
    try:
        yield
    finally:
        torch.set_num_threads(before)
