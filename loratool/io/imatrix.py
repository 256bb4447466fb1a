"""llama.cpp importance matrices (what ``llama-imatrix`` writes), read as ``llama-quantize``
reads them: its GGUF files (``<tensor>.in_sum2`` and ``<tensor>.counts`` per tensor) and the
legacy ``.dat`` format. Each entry becomes one importance per column of its tensor (per expert
and column for an expert tensor): the sums of squared activations divided by their counts, in
float32 as llama-quantize divides them.

The file is checked as strictly as a model: every count and length bounded by the file's size
before anything is allocated, every value finite (llama-quantize refuses non-finite ones too).

Example::
    im = read_imatrix(Path("imatrix.gguf"))
    im.entries["blk.0.attn_q.weight"]            # float32 [4096]
    im.datasets, im.chunks
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, os_input_error
from ..headers.gguf import read_header
from ..headers.paths import check_regular
from ..headers.safetensors import read_tensor_bytes

SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """One importance matrix: per tensor name (llama.cpp's) a float32 vector."""

    path: Path
    entries: dict[str, torch.Tensor]
    datasets: list[str]
    chunks: int
    legacy: bool

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The importance of ``name``'s columns as ``[experts, 1, columns]`` (experts 1 for a
        matrix), or None where the file has no entry (llama-quantize then quantizes that
        tensor without one); an entry of another size is an error, as it is there."""
        e = self.entries.get(name)
        if e is None:
            return None
        cols = shape[-1]
        experts = shape[0] if len(shape) == 3 else 1
        if e.numel() != cols * experts:
            raise FormatError(f"{self.path}: the importance matrix of {name} has {e.numel()} "
                              f"values and the tensor {cols * experts} (columns × experts): "
                              "was it computed for this model?")
        return e.view(experts, 1, cols)


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix file, GGUF or legacy, with every entry divided by its counts."""
    check_regular(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise os_input_error(path, e) from e
    im = _from_gguf(path) if magic == b"GGUF" else _from_legacy(path)
    if not im.entries:
        raise FormatError(f"{path}: an importance matrix with no entries")
    for name, e in im.entries.items():
        if not bool(torch.isfinite(e).all()):
            raise FormatError(f"{path}: the importance matrix of {name} holds non-finite "
                              "values; compute it again")
        # means of squares are never negative, and all zero they would weight every value
        # by 0: ggml's searches then write the tensor as zeros
        if bool((e < 0).any()):
            raise FormatError(f"{path}: the importance matrix of {name} holds negative values "
                              "(means of squared activations cannot be); compute it again")
        if not bool((e != 0).any()):
            raise FormatError(f"{path}: the importance matrix of {name} is all zeros, which "
                              "would quantize the tensor to zeros; compute it again")
    return im


def _from_gguf(path: Path) -> Imatrix:
    h = read_header(path)
    infos = {i.name: i for i in h.infos}
    names = sorted({n[:-len(SUMS)] for n in infos if n.endswith(SUMS)}
                   | {n[:-len(COUNTS)] for n in infos if n.endswith(COUNTS)})
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
               if k not in h.kv]
    if missing:  # llama-quantize refuses such a file too
        raise FormatError(f"{path}: not an importance matrix llama-quantize reads (no "
                          f"{', '.join(missing)}); make it with llama-imatrix")
    entries = {}
    for name in names:
        sums, counts = infos.get(name + SUMS), infos.get(name + COUNTS)
        if sums is None or counts is None:
            raise FormatError(f"{path}: {name} has {'no counts' if counts is None else 'no sums'}"
                              "; the file is damaged")
        if sums.dtype != "F32" or counts.dtype != "F32":
            raise FormatError(f"{path}: the sums and counts of {name} must be F32")
        s = _f32(read_tensor_bytes(sums))
        c = _f32(read_tensor_bytes(counts))
        if c.numel() == 0 or s.numel() % c.numel():
            raise FormatError(f"{path}: {name} has {s.numel()} sums for {c.numel()} counts")
        # llama-quantize: counts rounded to integers (lround), each expert's sums divided by
        # its count in float32, 1 where an expert was never reached
        n = torch.floor(c.double().abs() + 0.5).copysign(c.double()).float()
        per = s.view(c.numel(), -1)
        entries[name] = torch.where(n[:, None] > 0, per / n[:, None],
                                    torch.ones_like(per)).reshape(-1)
    datasets = h.kv.get("imatrix.datasets")
    chunks = h.kv.get("imatrix.chunk_count")
    return Imatrix(path, entries, datasets if isinstance(datasets, list) else [],
                   chunks if isinstance(chunks, int) else 0, legacy=False)


def _f32(raw: bytes | bytearray | memoryview) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32) if len(raw) else torch.zeros(0)


def _from_legacy(path: Path) -> Imatrix:
    """The ``.dat`` format: entry count, then per entry its name, call count and sums; an
    optional trailer (chunk count, dataset name)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str) -> int:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise FormatError(f"{path}: ends inside {what}; not an importance matrix (a GGUF "
                              "one or llama.cpp's .dat), or incomplete")
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    count = take("<i", "the entry count")
    if count < 1 or count * 12 > len(data):
        raise FormatError(f"{path}: not an importance matrix (llama.cpp's GGUF or .dat format)")
    entries = {}
    for _ in range(count):
        size = take("<i", "an entry's name length")
        if size < 1 or pos + size > len(data):
            raise FormatError(f"{path}: an entry's name runs past the end of the file")
        try:
            name = data[pos:pos + size].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: an entry's name is not UTF-8; not an importance "
                              "matrix") from None
        pos += size
        calls, nval = take("<i", "an entry"), take("<i", "an entry")
        if nval < 1 or pos + 4 * nval > len(data):
            raise FormatError(f"{path}: {name} claims {nval} values, past the end of the file")
        sums = _f32(data[pos:pos + 4 * nval])
        pos += 4 * nval
        entries[name] = sums / float(calls) if calls > 0 else sums  # as llama-quantize does
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        chunks = take("<i", "the chunk count")
        if pos + 4 <= len(data):
            size = take("<i", "the dataset name")
            if 0 < size <= len(data) - pos:
                datasets = [data[pos:pos + size].decode("utf-8", "replace")]
    return Imatrix(path, entries, datasets, max(chunks, 0), legacy=True)


def describe(im: Imatrix) -> str:
    """The file as a report names it: path, chunks and dataset."""
    bits = [f"{len(im.entries)} entries"]
    if im.chunks:
        bits.append(f"{im.chunks} chunks")
    if im.datasets:
        bits.append("dataset " + ", ".join(str(d) for d in im.datasets[:3]))
    return f"{im.path} ({'; '.join(bits)})"

