"""Tensor data in and out of files: the torch side of what ``loratool.headers`` lists.

:func:`open_checkpoint` opens a checkpoint as the header layer does, with a
:class:`TorchSource` that reads each tensor when asked: safetensors data with positioned reads
(no mmap: memory stays near one tensor), GGUF tensors dequantized to float32, PyTorch pickles
with ``weights_only=True`` only (pickled code never runs). Also here: torch dtypes for
safetensors codes, zero-copy byte views of tensors, and reused buffers.

Example::
    ckpt = open_checkpoint("path/to/model")
    for info in ckpt.infos():
        w = ckpt.load(info.name, dtype=torch.float32)
"""

from __future__ import annotations

import ctypes
import math
import os
import pickle
import struct
import warnings
from pathlib import Path

import torch

from ..errors import FormatError, UnsafeFileError, os_input_error
from ..headers import checkpoint as headers
from ..headers.safetensors import DTYPES, TORCH_TO_CODE, TensorInfo, read_tensor_bytes
from ..numerics.quant import dequantize
from ..progress import SILENT, Progress

Checkpoint = headers.Checkpoint


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype code. Example: ``torch_dtype("BF16")``."""
    dt = getattr(torch, DTYPES[code][1], None)
    if dt is None:
        raise FormatError(f"dtype {code} is not supported by torch {torch.__version__}; "
                          "upgrade torch to read this tensor")
    return dt


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code for a torch dtype. Example: ``dtype_code(torch.float16)``."""
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_TO_CODE:
        raise FormatError(f"tensors of dtype {name} cannot be stored in safetensors")
    return TORCH_TO_CODE[name]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy view of a CPU tensor's bytes (no numpy needed); keep ``t`` alive meanwhile."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class Buffers:
    """Reused CPU buffers, grown as needed: fresh memory costs a page fault per 4 KiB, which
    on small VMs is slower than the reads and writes themselves."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A 1-D buffer of at least ``numel`` values, reused under ``key``."""
        b = self.bufs.get((key, dtype))
        if b is None or b.numel() < numel:
            b = self.bufs[(key, dtype)] = torch.empty(numel, dtype=dtype)
        return b

    def tensor(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``shape`` on the reused buffer ``key`` (valid until its next use)."""
        n = math.prod(shape)
        return self.get(key, dtype, n)[:n].view(shape)


# --------------------------------------------------------------------------- PyTorch pickles


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict with ``weights_only=True``: pickled code never runs."""
    def load(mmap: bool) -> object:
        with warnings.catch_warnings():  # torch warns about pickle protocols it reads fine
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)  # zip checkpoints map lazily: memory stays near one tensor
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = load(False)  # legacy (pre-1.6) format cannot be mapped
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise FormatError(f"{path}: not a readable PyTorch checkpoint "
                              f"({str(e).splitlines()[0]})") from e
        raise UnsafeFileError(
            f"{path}: refused to load: it holds pickled objects other than tensors, and "
            "loading them would run code from the file. Convert it to safetensors with a "
            "tool you trust, or get a safetensors copy") from e
    except OSError as e:
        raise os_input_error(path, e) from e
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError,
            struct.error) as e:  # what torch's unpickler raises on damaged bytes
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({first})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class TorchSource:
    """Reads a checkpoint's tensors into torch tensors (see ``headers.TensorSource``); keeps
    one pickled shard loaded at a time."""

    def __init__(self) -> None:
        self.pickles: dict[Path, dict[str, torch.Tensor]] = {}

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        state = self.pickles.get(path)
        if state is None:
            self.pickles.clear()  # one pickled shard in memory at a time
            state = self.pickles[path] = _torch_load(path)
        return state

    def list_pickle(self, path: Path) -> list[TensorInfo]:
        return [TensorInfo(name, dtype_code(t.dtype), tuple(t.shape), t.numel() * t.element_size(),
                           path) for name, t in self._state(path).items()]

    def load(self, ckpt: Checkpoint, info: TensorInfo, device: torch.device | str | None,
             dtype: torch.dtype | None, buffer: torch.Tensor | None) -> torch.Tensor:
        if ckpt.gguf is not None:  # quantized types dequantize to float32
            t = dequantize(read_tensor_bytes(info), info)
        elif info.offset >= 0:
            dt = torch_dtype(info.dtype)
            if info.nbytes == 0:
                t = torch.empty(info.shape, dtype=dt)
            elif buffer is not None and buffer.numel() >= info.nbytes:
                read_tensor_bytes(info, tensor_bytes(buffer))
                t = buffer[: info.nbytes].view(dt).reshape(info.shape)
            else:
                t = torch.frombuffer(read_tensor_bytes(info), dtype=dt).reshape(info.shape)
        else:
            t = self._state(info.file)[info.name].clone()
        if dtype is not None or device is not None:
            t = t.to(device=device, dtype=dtype)
        return t


def open_checkpoint(spec: str | os.PathLike[str], progress: Progress = SILENT) -> Checkpoint:
    """Open a checkpoint or adapter (a path or a Hub id) whose tensors can be loaded.

    Example: ``open_checkpoint("base/").load("model.norm.weight", dtype=torch.float32)``.
    """
    return headers.open_checkpoint(spec, progress, TorchSource())
