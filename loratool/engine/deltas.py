"""The changes a fine-tune made, streamed: which tensors two checkpoints share, their float32
differences one at a time, and how each changed tensor can be stored (as LoRA of some
layout, or in full). Shared by ``extract`` and ``analyze``.

Example::
    for name, W, dW, tuned_raw in diffs(base, tuned, pairs(base, tuned, [], []), "cpu", bar):
        M = matrix(dW, kind(name, dW.shape, None, False))
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import FormatError, os_input_error
from ..headers.changes import EMBEDDING
from ..headers.changes import HEAD_TENSOR as HEAD
from ..headers.safetensors import read_exactly
from ..io.tensors import Buffers, tensor_bytes

if TYPE_CHECKING:
    from ..headers.checkpoint import Checkpoint
    from ..headers.safetensors import TensorInfo
    from ..progress import Bar

    # what diffs yields per tensor: (name, W_base, ΔW, W_tuned as stored); for a resized or
    # an unchanged tensor the last is the tuned tensor's info
    Diff = tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | TensorInfo]

def matrix(delta: torch.Tensor, layout: str) -> torch.Tensor:
    """The matrix to factorise, oriented [out, in] as B [out, r] @ A [r, in] expects."""
    if layout in ("fan_in_fan_out", "embedding"):
        return delta.T
    if layout == "conv":
        return delta.reshape(delta.shape[0], -1)
    return delta


def diffs(base: Checkpoint, tuned: Checkpoint, names: list[str], dev: torch.device, bar: Bar
          ) -> Iterator[Diff]:
    """(name, W_base and ΔW in float32 on the device, W_tuned as stored) per tensor;
    W_base is None for a resized tensor (ΔW is then the tuned tensor) and both are None when
    unchanged. On the CPU all three live in buffers reused for the next tensors (fresh memory
    costs a page fault per 4 KiB): a caller that keeps one must copy it. The next pair is
    read in a background thread while the caller works on this one."""

    bufs, reads = Buffers(), [Buffers(), Buffers()]

    def read(i: int) -> tuple[torch.Tensor, torch.Tensor] | str | None:
        name = names[i]
        bi, ti = base.info(name), tuned.info(name)
        if bi.shape != ti.shape or not ti.dtype.startswith(("F", "BF")):
            return None
        same = _same_bytes(base, tuned, name, reads[i % 2])
        if same:
            return "unchanged"  # found without a whole-tensor buffer (embeddings are large)
        raws = (base.load(name, buffer=reads[i % 2].get("base", torch.uint8, bi.nbytes)),
                tuned.load(name, buffer=reads[i % 2].get("tuned", torch.uint8, ti.nbytes)))
        if same is None and raws[0].dtype == raws[1].dtype and torch.equal(*raws):
            return "unchanged"  # not comparable in the files (.bin, GGUF): loaded, then equal
        return raws

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, 0) if names else None
        for i, name in enumerate(names):
            assert pending is not None
            raws = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < len(names) else None
            bi, ti = base.info(name), tuned.info(name)
            bar.update(1)
            if bi.shape != ti.shape:
                if EMBEDDING.search(name) or HEAD.search(name):
                    yield name, None, tuned.load(name), ti  # resized vocabulary: store in full
                    continue
                raise FormatError(f"the models do not match: {name} is {list(bi.shape)} in "
                                  f"the base and {list(ti.shape)} in the tuned model")
            if raws is None:
                continue  # integer buffers are not weights
            if raws == "unchanged":  # told in the stored dtype: no float32 copies
                yield name, None, None, ti
                continue
            raw_base, raw_tuned = raws
            w_base, delta = _widened_difference(name, raw_base, raw_tuned, dev, bufs)
            yield name, w_base, delta, raw_tuned


COMPARE_CHUNK = 8 << 20


def _same_bytes(base: Checkpoint, tuned: Checkpoint, name: str, bufs: Buffers) -> bool | None:
    """Whether a tensor's bytes are identical in both safetensors files, read a chunk at a
    time and stopping at the first difference; None when the files cannot tell (other
    formats, other dtypes): the caller then compares the loaded tensors."""

    if base.gguf is not None or tuned.gguf is not None:
        return None
    bi, ti = base.local_info(name), tuned.local_info(name)
    if bi.offset < 0 or ti.offset < 0 or bi.dtype != ti.dtype or bi.nbytes != ti.nbytes:
        return None
    a = bufs.get("compare_base", torch.uint8, COMPARE_CHUNK)
    b = bufs.get("compare_tuned", torch.uint8, COMPARE_CHUNK)
    try:
        with open(bi.file, "rb", buffering=0) as fa, open(ti.file, "rb", buffering=0) as fb:
            for s in range(0, bi.nbytes, COMPARE_CHUNK):
                n = min(COMPARE_CHUNK, bi.nbytes - s)
                read_exactly(fa, tensor_bytes(a)[:n], bi.offset + s, bi)
                read_exactly(fb, tensor_bytes(b)[:n], ti.offset + s, ti)
                if not torch.equal(a[:n], b[:n]):
                    return False
    except OSError as e:
        raise os_input_error(e.filename or bi.file, e) from e
    return True


def _widened_difference(name: str, raw_base: torch.Tensor, raw_tuned: torch.Tensor,
                        dev: torch.device, bufs: Buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """W_base and W_tuned − W_base in float32 (both widened exactly; one dtype takes torch's
    fast kernels), in reused buffers on the CPU; NaN or Inf is an error."""

    if dev.type == "cpu":
        w_base = bufs.tensor("base32", torch.float32, tuple(raw_base.shape))
        w_base.copy_(raw_base)
        delta = bufs.tensor("delta", torch.float32, tuple(raw_tuned.shape))
        delta.copy_(raw_tuned).sub_(w_base)
    else:
        w_base = raw_base.to(device=dev, dtype=torch.float32)
        delta = raw_tuned.to(device=dev, dtype=torch.float32, copy=True).sub_(w_base)
    if delta.numel():
        lo, hi = (float(x) for x in torch.aminmax(delta))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FormatError(f"{name}: the difference holds NaN or Inf (a NaN or Inf in one "
                              "of the models); nothing was written")
    return w_base, delta
