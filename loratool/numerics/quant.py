"""GGUF tensor data: dequantized to float32 and quantized again, bit for bit as ggml does:
Q8_0 in torch and Q4_0 … Q5_1 through the ``gguf`` package (llama.cpp's own Python code, equal
to ggml's reference quantizer), the K-quants and IQ4_NL/IQ4_XS in torch (``kquants``,
``iquants``: the bytes of ggml's quantize_* functions).

Example::
    t = dequantize(raw, info)               # float32, the tensor's shape
    data = quantize(t, "Q8_0")              # the bytes ggml's reference quantizer gives
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from ..errors import FormatError
from ..headers.gguf import PLAIN, QUANTIZE, byte_size
from ..headers.safetensors import TensorInfo
from .iquants import QUANTIZERS as IQ_QUANTIZERS
from .iquants import quantize_iq4
from .kquants import QUANTIZERS, quantize_k

# the types ggml quantizes by a search that an importance matrix weights, which loratool does
# as ggml does (K-quants, IQ4_NL, IQ4_XS): what --imatrix applies to
SEARCHED = (*QUANTIZERS, *IQ_QUANTIZERS)

PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def quant_type(name: str) -> gguf.GGMLQuantizationType:
    """The gguf package's GGMLQuantizationType for a type name (``Q8_0``)."""
    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise FormatError(f"unknown GGUF tensor type {name}") from None


def dequantize(raw: bytes | bytearray | memoryview, info: TensorInfo) -> torch.Tensor:
    """A tensor's bytes as a float32 torch tensor of its shape (F16/BF16/F32: as stored)."""
    if info.nbytes == 0:  # an empty tensor (a rank-0 factor): nothing to read
        return torch.zeros(info.shape, dtype=torch.float32)
    if info.dtype in PLAIN:
        return torch.frombuffer(bytearray(raw), dtype=PLAIN_DTYPES[info.dtype]).reshape(
            info.shape)
    if info.dtype == "Q8_0":  # the gguf package's formula, in torch (tested bit for bit)
        blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 34)
        # views of the block's bytes as its float16 scale and int8 values (no copies: a
        # block's 34 bytes keep the scale 2-byte aligned), converted once
        d = blocks[:, :2].view(torch.float16).float()
        return (blocks[:, 2:].view(torch.int8).float().mul_(d)).reshape(info.shape)
    qt = quant_type(info.dtype)
    data = np.frombuffer(raw, dtype=np.uint8).reshape(
        gguf.quant_shape_to_byte_shape(info.shape, qt))
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # NaN scales: the caller refuses
            arr = gguf.quants.dequantize(data, qt)
    except NotImplementedError:
        raise FormatError(f"{info.name}: the gguf package cannot dequantize {info.dtype} "
                          "tensors; this tensor cannot be merged") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(info.shape)


def quantize(t: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> bytes:
    """A float32 tensor as ``type_name`` bytes, the bytes ggml writes: its reference quantizer,
    or for a K-quant with ``importance`` (the columns' weights, an imatrix entry) the weighted
    one llama-quantize runs with ``--imatrix``."""
    if type_name not in QUANTIZE:
        raise FormatError(f"loratool cannot write {type_name} tensors; choose one of "
                          f"{', '.join(QUANTIZE)} with --quant")
    byte_size(tuple(t.shape), type_name)  # a clear error for a row of partial blocks
    if type_name == "Q8_0":
        return _q8_0(t)
    if type_name in QUANTIZERS:
        return quantize_k(t, type_name, importance)
    if type_name in IQ_QUANTIZERS:
        return quantize_iq4(t, type_name, importance)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to refuse
        arr = gguf.quants.quantize(np.ascontiguousarray(t.float().numpy()), quant_type(type_name))
    return arr.tobytes()


_JUST_UNDER_HALF = torch.tensor(0.49999997)  # 0.5 − 2⁻²⁵, the float32 just below 0.5


def _q8_0(t: torch.Tensor) -> bytes:
    """Q8_0 exactly as the gguf package (and ggml's reference) computes it, in torch: per block
    of 32, d = max|x| / 127, q = x·(1/d) rounded half away from zero, d stored as float16."""
    x = t.float().reshape(-1, 32)
    d = x.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    n = x * inv  # |n| ≤ 127 and a few ulps
    # the gguf package's np_roundf (half away from zero: sign·(⌊|n|⌋ + ⌊2·frac⌋)) in two
    # passes instead of eight: n + copysign(0.5 − 2⁻²⁵, n) truncated. Equal for every float32
    # in [−128, 128] (checked exhaustively; tests/test_gguf.py checks every one near a tie):
    # the float sum rounds up to the next integer exactly when |n|'s fraction is ≥ 0.5
    n.add_(torch.copysign(_JUST_UNDER_HALF, n)).trunc_()
    out = torch.cat([d.half().view(torch.uint8), n.to(torch.int8).view(torch.uint8)], 1)
    return out.numpy().tobytes()
