"""GGUF files (llama.cpp): the header, read in plain Python, and ggml's tensor types.

A GGUF file is a header — key-value metadata, then one info per tensor (name, ggml shape, ggml
type, offset) — and the tensor data, aligned. Shapes here are numpy/torch order (outermost
first, as the ``gguf`` reader gives them); ggml's own order is the reverse. Tensor data is
dequantized and quantized in ``loratool.numerics.quant``.

Example::
    g = read_header(Path("model.gguf"))
    g.kv["general.architecture"], g.infos[0].dtype   # 'llama', 'Q8_0'
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, overload

from ..errors import FormatError, os_input_error
from .safetensors import TensorInfo

# what loratool writes, each the bytes ggml's quantizer writes (the gguf package's for the
# first eight, ggml's own for the K-quants and IQ4_NL/IQ4_XS: both checked in the tests);
# every type the gguf package can dequantize can be read
QUANTIZE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
PLAIN = ("F32", "F16", "BF16")  # stored as the torch dtype of the same name
MAX_KV_ARRAY_SHOWN = 16  # longer arrays (the tokenizer's) are kept as their length
# a metadata value as read: a number, a string, or a short array of them; a long array is the
# string "<array of N>"
GgufValue = Union[bool, int, float, str, list["GgufValue"]]
# struct formats of the integer scalars ``_Reader.take`` reads
_IntFormat = Literal["<B", "<b", "<H", "<h", "<I", "<i", "<Q", "<q"]


@dataclass
class GgufHeader:
    """What a GGUF file's header says; no tensor data is read to build this."""

    path: Path
    kv: dict[str, GgufValue]  # scalars and short arrays as values; long arrays as "<array of N>"
    infos: list[TensorInfo]
    alignment: int
    version: int
    info_start: int  # where the tensor infos begin: the bytes before are magic, counts and KV
    kv_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # scalar value spans

    @property
    def architecture(self) -> str | None:
        a = self.kv.get("general.architecture")
        return a if isinstance(a, str) else None

    def arch_value(self, key: str) -> GgufValue | None:
        """``{architecture}.{key}`` (``attention.head_count`` …), or None."""
        return self.kv.get(f"{self.architecture}.{key}")


# ggml's tensor types: id → (name, values per block, bytes per block), as ggml defines them
# (checked against the gguf package's GGML_QUANT_SIZES in the tests)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18)}


GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}
# metadata value types: id → struct format of one value (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


class _Reader:
    """Bounded reads from a GGUF file's bytes: every count is checked against what is left
    of the file before anything of that size is read or allocated."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: not a readable GGUF file: {what} (at byte "
                           f"{self.pos}); it is damaged or not what it claims: download it "
                           "again")

    @overload
    def take(self, fmt: _IntFormat) -> int: ...

    @overload
    def take(self, fmt: str) -> bool | int | float: ...

    def take(self, fmt: str) -> bool | int | float:
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.data):
            raise self.fail("the header runs past the end of the file")
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return v

    def count(self, what: str, each: int) -> int:
        """A uint64 count of items of at least ``each`` bytes that must fit in the file."""
        n = self.take("<Q")
        if n * each > len(self.data) - self.pos:
            raise self.fail(f"{what} claims {n:,} entries, more than the file's "
                            f"{len(self.data):,} bytes can hold")
        return n

    def string(self) -> str:
        n = self.count("a string", 1)
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "backslashreplace")

    def value(self, kind: int, depth: int = 0) -> GgufValue:
        """One metadata value; arrays longer than MAX_KV_ARRAY_SHOWN as their length."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY or depth > 2:
            raise self.fail(f"unknown metadata value type {kind}")
        inner = self.take("<I")
        each = struct.calcsize(_SCALARS[inner]) if inner in _SCALARS else 8 if inner in (
            _STRING, _ARRAY) else 0
        if not each:
            raise self.fail(f"unknown metadata array type {inner}")
        n = self.count("a metadata array", each)
        if n > MAX_KV_ARRAY_SHOWN and inner in _SCALARS:  # skipped, never materialised
            self.pos += n * each
            return f"<array of {n}>"
        if n > MAX_KV_ARRAY_SHOWN and inner == _STRING:  # a vocabulary: walked, not decoded
            for _ in range(n):
                k = self.count("a string", 1)  # advances past the length first
                self.pos += k
            return f"<array of {n}>"
        items = [self.value(inner, depth + 1) for _ in range(n)]
        return items if n <= MAX_KV_ARRAY_SHOWN else f"<array of {n}>"


def read_header(path: Path) -> GgufHeader:
    """Parse and check a GGUF header in plain Python, as strictly as llama.cpp reads it:
    counts bounded by the file's size before anything is allocated; every tensor of a known
    type whose rows are whole blocks, its bytes what its type and shape need, at an offset
    aligned to ``general.alignment``, inside the data and overlapping no other tensor."""

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise FormatError(f"{path}: {size} bytes, too short for a GGUF header; is it "
                                  "complete?")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(_Reader(data, path), size)
    except OSError as e:
        raise os_input_error(path, e) from e


def _parse(r: _Reader, size: int) -> GgufHeader:
    path = r.path
    if bytes(r.data[:4]) != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (no GGUF magic)")
    r.pos = 4
    version = r.take("<I")
    if version not in (2, 3):
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            raise FormatError(f"{path}: a big-endian GGUF file; loratool reads little-endian "
                              "GGUF (what llama.cpp writes on every common machine)")
        raise FormatError(f"{path}: GGUF version {version}; loratool reads versions 2 and 3")
    n_tensors = r.count("the tensor count", 24)  # name length, dims, type, offset
    n_kv = r.count("the metadata count", 13)  # key length, type, one byte
    kv: dict[str, GgufValue] = {}
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(n_kv):
        key = r.string()
        if key in kv:
            raise r.fail(f"metadata key {key!r} appears twice")
        kind = r.take("<I")
        start = r.pos
        kv[key] = r.value(kind)
        if kind in _SCALARS:  # patchable in place
            spans[key] = (start, r.pos - start)
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or \
            alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment is {alignment!r}, not a power of two")
    info_start = r.pos
    raw: list[tuple[str, tuple[int, ...], str, int, int]] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = r.string()
        if name in names:
            raise r.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.take("<I")
        if n_dims > MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows {MAX_DIMS})")
        dims = [r.take("<Q") for _ in range(n_dims)]
        type_id = r.take("<I")
        offset = r.take("<Q")
        if type_id not in GGML_TYPES:
            raise r.fail(f"tensor {name!r} has unknown type {type_id}")
        type_name, block, type_size = GGML_TYPES[type_id]
        if dims and dims[0] % block:
            raise r.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole blocks of "
                         f"{block} ({type_name})")
        count = math.prod(dims)
        if count >= 1 << 62:
            raise r.fail(f"tensor {name!r} claims {count:,} values")
        shape = tuple(reversed(dims))  # numpy order: outermost first
        raw.append((name, shape, type_name, offset, count // block * type_size))
    data_start = r.pos + padding(r.pos, alignment)
    data_size = size - data_start
    infos = []
    for name, shape, type_name, offset, nbytes in raw:
        if offset % alignment:
            raise FormatError(f"{path}: tensor {name!r} starts at data offset {offset}, not a "
                              f"multiple of the alignment {alignment}: the header is damaged")
        if offset + nbytes > max(data_size, 0):
            raise FormatError(f"{path}: tensor {name!r} ({type_name} {list(shape)}, {nbytes:,} "
                              f"bytes) ends at data offset {offset + nbytes:,}, beyond the "
                              f"file's {max(data_size, 0):,} bytes of data: the file is "
                              "truncated or its header damaged")
        infos.append(TensorInfo(name, type_name, shape, nbytes, path, data_start + offset))
    prev = None
    for info in sorted(infos, key=lambda i: (i.offset, i.nbytes)):
        if prev is not None and info.offset < prev.offset + prev.nbytes:
            raise FormatError(f"{path}: tensors {prev.name!r} and {info.name!r} overlap in "
                              "the file: the header is damaged")
        prev = info
    return GgufHeader(path, kv, infos, alignment, version, info_start, spans)


# --------------------------------------------------------------------------- tensors

def type_id(name: str) -> int:
    """ggml's number for a tensor type name (``Q8_0`` → 8)."""
    try:
        return GGML_TYPE_IDS[name]
    except KeyError:
        raise FormatError(f"unknown GGUF tensor type {name}") from None


def byte_size(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes a tensor of ``shape`` (numpy order) takes in ``type_name``; a row length that is
    not a whole number of blocks is an error naming the type's block size."""
    _, block, size = GGML_TYPES[type_id(type_name)]
    if shape and shape[-1] % block:
        fits = [t for t in QUANTIZE if shape[-1] % GGML_TYPES[type_id(t)][1] == 0]
        raise FormatError(f"{type_name} stores rows in blocks of {block} values, and a row "
                          f"here has {shape[-1]}: choose another --quant ({', '.join(fits)})")
    return math.prod(shape) // block * size


# --------------------------------------------------------------------------- writing

def tensor_info_bytes(name: str, shape: tuple[int, ...], type_name: str, offset: int) -> bytes:
    """One tensor info as the header stores it (little-endian): name, ggml dims, type,
    offset from the start of the data."""
    b = name.encode("utf-8")
    dims = list(reversed(shape)) or [1]
    return (struct.pack("<Q", len(b)) + b + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id(type_name), offset))


def padding(n: int, alignment: int) -> int:
    """Bytes to add after ``n`` to reach a multiple of ``alignment``."""
    return (-n) % alignment
