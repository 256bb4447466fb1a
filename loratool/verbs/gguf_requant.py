"""One changed tensor of a GGUF merge: dequantized, merged in float32 by the kernel and quantized
again (its own type or ``--quant``; K-quants and IQ4 with an importance matrix where ``--imatrix``
gives one), a block of rows at a time, with the error the quantization adds measured; and
what the report says of the importance matrices.

K-quant blocks are quantized in worker threads, in order (ggml's searches are many small
torch operations that release the GIL), while the next block is merged.

Example::
    change = merged_tensor(base, info, edit, "Q4_K", torch.device("cpu"), f.write, Buffers())
    change.error_vs_change
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch

from ..engine import kernel
from ..engine.plan import Edit
from ..errors import FormatError, LoraToolError
from ..headers.checkpoint import Checkpoint
from ..headers.gguf import GgufHeader
from ..headers.safetensors import TensorInfo, read_tensor_bytes
from ..io.imatrix import Imatrix, describe
from ..io.tensors import Buffers
from ..numerics.ops import sum_squares
from ..numerics.quant import SEARCHED, dequantize, quantize
from ..reports.merge import GgufChange, ImatrixUse

QUANT_CHUNK = 1 << 18  # values quantized at a time (1 MiB of float32: stays in cache)


# what llama-quantize quantizes with an importance matrix by its own routine that loratool
# does not have (Q8_0, F16, BF16 and F32 ignore the matrix in ggml; the K-quants and IQ4_NL/
# IQ4_XS use it here)
WEIGHTED_ELSEWHERE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


def importance_of(im: Imatrix, base: Checkpoint, types: dict[str, str]
                ) -> dict[str, torch.Tensor]:
    """Each changed K-quant or IQ4 tensor's importance ([experts, 1, columns]) where the file has
    an entry, as llama-quantize passes it; a type quantized otherwise with one is refused."""
    if not any(n in base.tensors for n in im.entries):
        raise FormatError(f"--imatrix {im.path}: none of its {len(im.entries)} entries names a "
                          "tensor of this model (it has e.g. "
                          f"{next(iter(im.entries))}): was it computed for this model?")
    out = {}
    for name, t in types.items():
        entry = im.for_tensor(name, base.info(name).shape)
        if entry is None:
            continue
        if t in WEIGHTED_ELSEWHERE:
            raise FormatError(f"--imatrix: {name} is written as {t}, which llama-quantize "
                              "quantizes with an importance matrix in a way loratool does not "
                              "(it does for the K-quants and IQ4_NL/IQ4_XS); leave out "
                              "--imatrix, or pass --quant Q4_K (or Q8_0)")
        if t in SEARCHED:
            out[name] = entry
    return out


def imatrix_use(im: Imatrix, types: dict[str, str], importance: dict[str, torch.Tensor]
         ) -> ImatrixUse:
    """What the report says of the importance matrix given."""
    quantized = [n for n, t in types.items() if t in SEARCHED]
    return ImatrixUse(file=describe(im), used=sorted(importance),
                      no_entry=sorted(n for n in quantized if n not in importance),
                      not_weighted=sorted(n for n, t in types.items() if t not in SEARCHED))


IMATRIX = "quantize.imatrix."  # what llama-quantize records of the importance matrix it used


def imatrix_note(h: GgufHeader, types: dict[str, str]) -> str | None:
    """What to say when the base was quantized with an importance matrix (its metadata says
    so) and changed tensors of a type ggml weights with one were re-quantized without it;
    None otherwise."""
    weighted = [t for t in types.values() if t in SEARCHED or t in WEIGHTED_ELSEWHERE]
    keys = {k[len(IMATRIX):]: v for k, v in h.kv.items() if k.startswith(IMATRIX)}
    if not keys or not weighted:
        return None
    what = ", ".join(f"{k} {v}" for k, v in keys.items() if k in ("file", "chunks_count"))
    hint = ("; pass that matrix with --imatrix FILE to quantize them as the base was"
            if all(t in SEARCHED for t in weighted) else "")
    return (f"the base was quantized with an importance matrix ({what or 'quantize.imatrix.*'}"
            f"); the {len(weighted)} re-quantized tensor(s) were quantized without one, as "
            f"llama-quantize does without --imatrix{hint}")


def merged_tensor(base: Checkpoint, info: TensorInfo, edit: Edit, type_name: str,
                  device: torch.device, sink: Callable[[bytes], None], bufs: Buffers,
                  importance: torch.Tensor | None = None, workers: int = 1) -> GgufChange:
    """One changed tensor: dequantized, merged in float32 by the kernel, quantized, handed to
    ``sink`` a block of rows at a time; what that cost. An edit that only adds runs on the
    CPU a block of rows at a time from the quantized bytes (the products whole, as for a
    safetensors merge: the same bits); anything else (DoRA, biases, a full tensor, a GPU)
    merges the whole tensor first. ``importance``: the columns' weights per expert
    ([experts, 1, columns]) for a K-quant quantized as with an importance matrix; ``workers``:
    threads that quantize K-quant blocks side by side (ggml's searches are many small torch
    operations, which release the GIL while they compute)."""
    sq = _Squares()
    n_rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1

    def weights(r: int, r1: int) -> torch.Tensor | None:  # rows r…r1's importance
        if importance is None:
            return None
        per_expert = n_rows // importance.shape[0]
        return importance[torch.arange(r, r1) // per_expert, 0]

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
        """(merged rows, base rows, first row, end row), a block of rows at a time."""
        stats = kernel.Stats()
        if device.type == "cpu" and kernel.is_rows_only(edit) and len(info.shape) >= 2:
            raw = read_tensor_bytes(info)
            row_bytes = len(raw) // math.prod(info.shape[:-1])
            prods = kernel.products(edit, device, bufs)
            flat = [kernel.Product(p.delta.reshape(-1, info.shape[-1]), p.scale, p.weight)
                    for p in prods]
            for r, r1, W in _row_blocks(info, raw, row_bytes):
                M = W.clone()
                kernel.add_rows(M, flat, slice(r, r1), 1.0, stats)
                yield M, W, r, r1
        else:
            W = base.load(info.name).to(device=device, dtype=torch.float32)
            merged = kernel.merged(W.clone(), edit, 1.0, device, name=info.name,
                                   stats=stats).cpu()
            W = W.cpu()
            m2 = merged.reshape(merged.shape[0], -1) if merged.dim() > 1 else merged.reshape(
                1, -1)
            w2 = W.reshape(m2.shape)
            step = max(1, QUANT_CHUNK // max(1, m2.shape[1]))
            for r in range(0, m2.shape[0], step):
                r1 = min(r + step, m2.shape[0])
                yield m2[r:r1], w2[r:r1], r, r1

    def quantized(block: tuple[torch.Tensor, torch.Tensor, int, int]) -> tuple[bytes, _Squares]:
        M, W, r, r1 = block
        part = _Squares()
        return _quantized(M, W, type_name, info, part, weights(r, r1)), part

    for data, part in in_order(quantized, blocks(), workers if type_name in SEARCHED else 1):
        sink(data)
        sq.add(part)
    err, change, norm, w_norm = (math.sqrt(x) for x in (sq.error, sq.change, sq.result,
                                                         sq.base))
    return GgufChange(name=info.name, type=info.dtype, written_as=type_name,
                      rel_error=err / norm if norm else 0.0,
                      error_vs_change=err / change if change else (0.0 if not err
                                                                   else math.inf),
                      change=change / (w_norm or math.inf))


def _overflow(name: str, type_name: str, M: torch.Tensor, importance: torch.Tensor | None
              ) -> LoraToolError:
    """What to say when the quantized rows read back as Inf or NaN."""
    big = float(M.abs().max())
    why = f"its largest value ({big:.4g})"
    if importance is not None:
        why += f" or its importance (up to {float(importance.abs().max()):.4g})"
    return LoraToolError(f"{name}: written as {type_name} it would hold Inf or NaN ({why} is "
                         f"past what {type_name}'s float16 scales hold); nothing was written: "
                         "pass --quant F32 (or check the base, the adapter and --imatrix)")


@dataclass
class _Squares:
    """Sums of squares over one tensor's row blocks."""

    error: float = 0.0  # ‖quantized − exact‖²
    change: float = 0.0  # ‖W′ − W‖²
    result: float = 0.0  # ‖W′‖²
    base: float = 0.0  # ‖W‖²

    def add(self, o: _Squares) -> None:
        self.error += o.error
        self.change += o.change
        self.result += o.result
        self.base += o.base


T = TypeVar("T")
R = TypeVar("R")


def in_order(fn: Callable[[T], R], items: Iterator[T], workers: int) -> Iterator[R]:
    """``fn`` of each item, in order; with several workers, up to ``workers`` items computed
    ahead in threads (the next block is merged while earlier ones are quantized)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="loratool-quant") as pool:
        ahead: deque[Future[R]] = deque()
        for item in items:
            ahead.append(pool.submit(fn, item))
            if len(ahead) > workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _row_blocks(info: TensorInfo, raw: bytes | bytearray | memoryview, row_bytes: int
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, end row, W's rows in float32) of a stored tensor seen as rows of its last
    dimension (as GGUF stores them), a block at a time."""
    cols, n_rows = info.shape[-1], math.prod(info.shape[:-1])
    step = max(1, QUANT_CHUNK // max(1, cols))
    for r in range(0, n_rows, step):
        r1 = min(r + step, n_rows)
        part = type(info)(info.name, info.dtype, (r1 - r, cols), (r1 - r) * row_bytes,
                          info.file)
        yield r, r1, dequantize(raw[r * row_bytes:r1 * row_bytes], part).float()


def _quantized(M: torch.Tensor, W: torch.Tensor, type_name: str, info: TensorInfo,
               sq: _Squares, importance: torch.Tensor | None = None) -> bytes:
    """Rows of the result quantized (with their columns' importance where given); their
    error, change and norms added to ``sq``."""
    kernel.guard(M, None, info.name)
    data = quantize(M, type_name, importance)
    back = dequantize(data, type(info)(info.name, type_name, tuple(M.shape), len(data),
                                       info.file))
    error = sum_squares(diff := back.float().sub_(M))
    # M is finite (guarded), so an Inf or NaN read back (a float16 scale overflowed: llama.cpp
    # refuses it) makes the error sum Inf or NaN; only then is the whole block looked at (a
    # pass over every block cost a Q8_0 merge a sixth of its time)
    if not math.isfinite(error) and not bool(torch.isfinite(diff).all()):
        raise _overflow(info.name, type_name, M, importance)
    sq.error += error
    sq.change += sum_squares(M - W)
    sq.result += sum_squares(M)
    sq.base += sum_squares(W)
    return data
