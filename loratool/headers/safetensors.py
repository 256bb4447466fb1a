"""safetensors itself, and what a tensor file is: dtypes, headers checked as strictly as the
safetensors library checks them, positioned reads of one tensor's bytes, and the sniffing of a
file's first bytes. Plain Python: listing a checkpoint never imports torch (the torch side of
dtypes and buffers is ``loratool.io.tensors``).

Example::
    infos, metadata = read_safetensors_header(Path("model.safetensors"))
    raw = read_tensor_bytes(infos[0])
"""

from __future__ import annotations

import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import FormatError, os_input_error
from .checks import depth, parse_json

if sys.byteorder != "little":  # safetensors data is little-endian; so is every host we know
    raise ImportError("loratool reads and writes safetensors data as little-endian, the "
                      "byte order of this machine is not")

# safetensors dtype code -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "C64": (8, "complex64"),
}
TORCH_TO_CODE: dict[str, str] = {name: code for code, (_, name) in DTYPES.items()}

# safetensors refuses headers above 100 MB; a larger length field means a damaged file
MAX_HEADER_BYTES = 100_000_000
# serde_json, which the safetensors library parses headers with, stops at 128 levels; a real
# header nests 3 (object, tensor entry, shape list)
MAX_HEADER_DEPTH = 64
MAX_TENSORS = 1 << 18  # tensors in one file: real checkpoints hold thousands at most
MAX_DIM = 1 << 48  # one dimension: beyond any real tensor (and what torch can index)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

REMOTE = -2  # TensorInfo.offset of a tensor whose file is still on the Hub


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: no data is read to build this."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", …
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file; -1 otherwise

    @property
    def params(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def dtype_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return DTYPES[code][0]


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check a local safetensors header; tensor infos (file order) and metadata.

    Every check that the safetensors library makes is made here too, with a message that
    names the file and the tensor, so that a damaged file fails before anything is written.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = header_length(head, size, path)
            raw = f.read(n)
    except OSError as e:
        raise os_input_error(path, e) from e
    return parse_safetensors_header(raw, n, size, path)


def header_length(head: bytes, size: int, path: Path | str) -> int:
    if len(head) < 8:
        raise FormatError(f"{path}: file is {size} bytes, too short to be safetensors "
                          "(truncated download? fetch it again)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise FormatError(f"{path}: header length {n} is larger than the file "
                          f"({size} bytes): the file is truncated or not safetensors")
    return n


def parse_safetensors_header(raw: bytes, n: int, size: int, path: Path
                             ) -> tuple[list[TensorInfo], dict[str, str]]:
    """Check the JSON header ``raw`` (``n`` bytes) of a safetensors file of ``size`` bytes."""
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # before parsing: memory stays bounded
        raise FormatError(f"{path}: the header lists more than {MAX_TENSORS:,} tensors, far "
                          "beyond any real checkpoint: the file is damaged or hostile")
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    if depth(header) > MAX_HEADER_DEPTH:
        raise FormatError(f"{path}: the safetensors header nests JSON {depth(header)} levels "
                          f"deep (the safetensors library reads at most {MAX_HEADER_DEPTH}): "
                          "the file is damaged or hostile")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + n
    data_len = size - base
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise FormatError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets")
        code, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {code!r} "
                              f"(known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= 16
                and all(type(d) is int and 0 <= d < MAX_DIM for d in shape)):
            raise FormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise FormatError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        nbytes = offs[1] - offs[0]
        want = math.prod(shape) * DTYPES[code][0]
        if nbytes != want:
            raise FormatError(f"{path}: tensor {name!r} shape {shape} of {code} needs {want} "
                              f"bytes but its data_offsets hold {nbytes}: the header is damaged")
        if offs[1] > data_len:
            raise FormatError(f"{path}: tensor {name!r} data ends at byte {base + offs[1]} but "
                              f"the file has {size}: the file is truncated (fetch it again)")
        infos.append(TensorInfo(name, code, tuple(shape), nbytes, path, base + offs[0]))
    # As the safetensors library requires: the tensors' data tile the buffer exactly, with no
    # overlap (two tensors sharing bytes), no gap and nothing after the last one.
    pos, prev = 0, None
    for start, end, name in sorted((i.offset - base, i.offset - base + i.nbytes, i.name)
                                   for i in infos):
        if start < pos:
            raise FormatError(f"{path}: tensors {prev!r} and {name!r} overlap in the file: "
                              "the header is damaged")
        if start > pos:
            raise FormatError(f"{path}: {start - pos} bytes before tensor {name!r} belong to no "
                              "tensor: the header is damaged")
        pos, prev = end, name
    if pos != data_len:
        raise FormatError(f"{path}: {data_len - pos} bytes after the last tensor belong to no "
                          "tensor: the file is damaged or was appended to")
    return infos, dict(meta)


def read_tensor_bytes(info: TensorInfo, into: memoryview | None = None) -> bytearray | memoryview:
    """Read one tensor's bytes with a positioned read (no mmap: RSS stays near one tensor),
    into a new buffer or into ``into`` (a caller's reused buffer: fresh memory costs a page
    fault per 4 KiB, which on some machines is slower than the read itself)."""
    buf = bytearray(info.nbytes) if into is None else into[: info.nbytes]
    try:
        with open(info.file, "rb", buffering=0) as f:
            read_exactly(f, memoryview(buf), info.offset, info)
    except OSError as e:
        raise os_input_error(info.file, e) from e
    return buf


def read_exactly(f: BinaryIO, view: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill ``view`` from ``offset`` of the open file ``f`` (a part of ``info``'s tensor)."""
    done = 0
    while done < len(view):
        got = pread_into(f, view[done:], offset + done)
        if got == 0:
            raise FormatError(f"{info.file}: ended while reading tensor {info.name!r}: "
                              "the file is truncated or changed while being read")
        done += got


def pread_into(f: BinaryIO, view: memoryview, offset: int) -> int:
    """Read at an offset into ``view``: ``preadv`` (Linux, BSD) straight into the buffer,
    ``pread`` (macOS) with one copy, or seek and read where neither exists (Windows)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], offset)
    if hasattr(os, "pread"):
        chunk = os.pread(f.fileno(), min(len(view), 1 << 26), offset)
        view[: len(chunk)] = chunk
        return len(chunk)
    f.seek(offset)
    return f.readinto(view) or 0


def sniff(head: bytes) -> str:
    """What a file's first bytes say it is: ``safetensors``, ``zip`` (a PyTorch checkpoint),
    ``pickle``, ``gguf``, ``json``, ``text`` or ``unknown``."""
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) > 8 and head[8:9] == b"{":  # before the pickle test: a length may start 0x80
        return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "json"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        decoded = ""
    if decoded and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        return "text"
    return "unknown"


NOT_WEIGHTS = {
    "json": "a JSON file, not weights: point at the folder that holds it and the weights",
    "text": "a text file, not weights: point at a .safetensors, .bin or model folder",
    "unknown": "not a checkpoint loratool reads (safetensors, or a PyTorch .bin/.pt); is it "
               "complete, and the file you meant?",
}


# Weights of any framework: never copied beside new weights (they would contradict them).
NOT_CONFIG_SUFFIXES = WEIGHT_SUFFIXES + (".index.json", ".gguf", ".ckpt", ".h5", ".msgpack",
                                         ".onnx", ".onnx_data", ".onnx.data", ".npz", ".pb",
                                         ".tflite", ".ot", ".mlmodel", ".data")
