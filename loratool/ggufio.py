"""GGUF files (llama.cpp): headers, tensor data and quantization, with the ``gguf`` package.

A GGUF file is a header — key-value metadata, then one info per tensor (name, ggml shape, ggml
type, offset) — and the tensor data, aligned. Shapes here are numpy/torch order (outermost
first, as the ``gguf`` reader gives them); ggml's own order is the reverse. F32, F16 and BF16
tensors load as they are; quantized ones are dequantized to float32 with the ``gguf`` package's
own code, and :func:`quantize` re-quantizes with it (the types it can write: ``QUANTIZE``).

Example::

    g = read_header(Path("model.gguf"))
    g.kv["general.architecture"], g.infos[0].dtype   # 'llama', 'Q8_0'
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FormatError, os_input_error
from .tensorfile import TensorInfo

# what the gguf package can quantize to (checked against it in the tests); every type it can
# dequantize can be read
QUANTIZE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
PLAIN = ("F32", "F16", "BF16")  # stored as the torch dtype of the same name
MAX_KV_ARRAY_SHOWN = 16  # longer arrays (the tokenizer's) are kept as their length


@dataclass
class GgufHeader:
    """What a GGUF file's header says; no tensor data is read to build this."""

    path: Path
    kv: dict[str, Any]  # scalars and short arrays as values; long arrays as "<array of N>"
    infos: list[TensorInfo]
    alignment: int
    version: int
    info_start: int  # where the tensor infos begin: the bytes before are magic, counts and KV
    kv_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # scalar value spans

    @property
    def architecture(self) -> str | None:
        a = self.kv.get("general.architecture")
        return a if isinstance(a, str) else None

    def arch_value(self, key: str) -> Any:
        """``{architecture}.{key}`` (``attention.head_count`` …), or None."""
        return self.kv.get(f"{self.architecture}.{key}")


def read_header(path: Path) -> GgufHeader:
    """Parse a GGUF header with the gguf package (a damaged file is a clear error)."""
    try:
        import gguf
    except ImportError as e:  # a dependency: only a broken install lacks it
        raise FormatError("reading GGUF needs the gguf package: pip install gguf") from e
    try:
        r = gguf.GGUFReader(str(path))
    except OSError as e:
        raise os_input_error(path, e) from e
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeError) as e:
        raise FormatError(f"{path}: not a readable GGUF file ({e}); is it complete?") from e
    if r.byte_order != "I":
        raise FormatError(f"{path}: a big-endian GGUF file; loratool reads little-endian GGUF "
                          "(what llama.cpp writes on every common machine)")
    kv: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kv[name] = _value(f, gguf)
        if len(f.types) == 1 and f.types[0] != gguf.GGUFValueType.STRING:
            part = f.parts[-1]  # the value of a scalar field: patchable in place
            start = int(part.ctypes.data - r.data.ctypes.data)
            spans[name] = (start, int(part.nbytes))
    size = path.stat().st_size
    infos = []
    for t in r.tensors:
        dtype = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.data_offset + int(t.n_bytes) > size:
            raise FormatError(f"{path}: tensor {t.name} ends beyond the end of the file; the "
                              "file is truncated (download it again)")
        infos.append(TensorInfo(t.name, dtype, shape, int(t.n_bytes), path, int(t.data_offset)))
    start = int(r.tensors[0].field.offset) if r.tensors else int(r.data_offset)
    version = int(r.fields["GGUF.version"].parts[0][0])
    return GgufHeader(path, kv, infos, int(r.alignment), version, start, spans)


def _value(f: Any, gguf: Any) -> Any:
    """A KV value as Python: scalars and strings as they are, long arrays by their length."""
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > MAX_KV_ARRAY_SHOWN:
        return f"<array of {len(f.data)}>"
    try:
        v = f.contents()
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"metadata {f.name}: not readable ({e})") from e
    return v.item() if hasattr(v, "item") else v


# --------------------------------------------------------------------------- tensors


def quant_type(name: str) -> Any:
    """The gguf package's GGMLQuantizationType for a type name (``Q8_0``)."""
    import gguf

    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise FormatError(f"unknown GGUF tensor type {name}") from None


def byte_size(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes a tensor of ``shape`` (numpy order) takes in ``type_name``; a row length that is
    not a whole number of blocks is an error naming the type's block size."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[quant_type(type_name)]
    if shape and shape[-1] % block:
        raise FormatError(f"{type_name} stores rows in blocks of {block} values, and a row "
                          f"here has {shape[-1]}: choose another --quant (F16, BF16, F32)")
    return math.prod(shape) // block * size


def dequantize(raw: bytes | bytearray | memoryview, info: TensorInfo) -> Any:
    """A tensor's bytes as a float32 torch tensor of its shape (F16/BF16/F32: as stored)."""
    import numpy as np
    import torch

    from .tensorfile import torch_dtype

    if info.dtype in PLAIN:
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype(info.dtype)).reshape(
            info.shape)
    if info.dtype == "Q8_0":  # the gguf package's formula, in torch (tested bit for bit)
        blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(info.shape)
    import gguf

    qt = quant_type(info.dtype)
    data = np.frombuffer(raw, dtype=np.uint8).reshape(
        gguf.quant_shape_to_byte_shape(info.shape, qt))
    try:
        arr = gguf.quants.dequantize(data, qt)
    except NotImplementedError:
        raise FormatError(f"{info.name}: the gguf package cannot dequantize {info.dtype} "
                          "tensors; this tensor cannot be merged") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(info.shape)


def quantize(t: Any, type_name: str) -> bytes:
    """A float32 tensor as ``type_name`` bytes, with the gguf package's own quantizer."""
    import numpy as np

    if type_name not in QUANTIZE:
        raise FormatError(f"the gguf package cannot write {type_name} tensors; choose one of "
                          f"{', '.join(QUANTIZE)} with --quant")
    byte_size(tuple(t.shape), type_name)  # a clear error for a row of partial blocks
    if type_name == "Q8_0":
        return _q8_0(t)
    import gguf

    arr = gguf.quants.quantize(np.ascontiguousarray(t.float().numpy()), quant_type(type_name))
    return arr.tobytes()


def _q8_0(t: Any) -> bytes:
    """Q8_0 exactly as the gguf package (and ggml's reference) computes it, in torch: per block
    of 32, d = max|x| / 127, q = x·(1/d) rounded half away from zero, d stored as float16."""
    import torch

    x = t.float().reshape(-1, 32)
    d = x.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    n = x * inv
    a = n.abs()
    fl = a.floor()
    q = torch.sign(n) * (fl + (2 * (a - fl)).floor())  # the gguf package's np_roundf
    out = torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], 1)
    return out.numpy().tobytes()


# --------------------------------------------------------------------------- writing


def tensor_info_bytes(name: str, shape: tuple[int, ...], type_name: str, offset: int) -> bytes:
    """One tensor info as the header stores it (little-endian): name, ggml dims, type,
    offset from the start of the data."""
    b = name.encode("utf-8")
    dims = list(reversed(shape)) or [1]
    return (struct.pack("<Q", len(b)) + b + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", int(quant_type(type_name)), offset))


def padding(n: int, alignment: int) -> int:
    return (-n) % alignment
