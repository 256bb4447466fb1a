"""``loratool merge`` into a GGUF model (llama.cpp), quantized or not.

Streams tensor by tensor: a tensor no adapter changes is copied byte for byte; a changed one
is dequantized (the ``gguf`` package's own code), merged in float32 exactly as a safetensors
merge is (``engine.kernel``), and quantized again to its own type or ``--quant``. The
report gives, per changed tensor, the error the re-quantization adds against the exact float32
merge, relative to the tensor and to the adapter's change (how much of ΔW the quantization
noise is comparable to). The header's metadata is copied as it is, but for a file type that
--quant made untrue (``general.file_type``: the type most of the layers' values have).

Example::
    report = merge_into_gguf(open_checkpoint("model-Q8_0.gguf"), [Part(adapter, 1.0, "a/")],
                             Path("merged.gguf"), [], MergeSettings(1.0, torch.device("cpu")))
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from ..engine.plan import Edit, plan_edits
from ..errors import FormatError, LoraToolError
from ..formats import require_lora
from ..formats.gguf_names import Arch, tensor_name, to_gguf
from ..headers.checkpoint import Checkpoint
from ..headers.gguf import QUANTIZE, GgufHeader, byte_size, padding, read_header, tensor_info_bytes
from ..headers.safetensors import TensorInfo, read_tensor_bytes
from ..io.directio import SequentialWriter
from ..io.imatrix import read_imatrix
from ..io.staging import Stage, check_output, output_os_error
from ..io.tensors import Buffers
from ..model.adapter import LoraAdapter
from ..numerics.device import quant_workers_count
from ..numerics.quant import quantize
from ..reports.merge import GgufChange, GgufMergeReport, GgufVerify
from . import prechecks
from .gguf_requant import imatrix_note, imatrix_use, importance_of, merged_tensor
from .merge_settings import MergeSettings, Part, named

COPY_CHUNK = 8 << 20  # unchanged tensors are copied this many bytes at a time


def merge_into_gguf(base: Checkpoint, parts: list[Part], out: Path, inputs: list[Path],
                    s: MergeSettings, t0: float | None = None) -> GgufMergeReport:
    """Merge the adapters of ``parts`` into the GGUF ``base``; writes ``out`` (a .gguf file)."""

    t0 = time.perf_counter() if t0 is None else t0
    assert base.gguf is not None
    where = str(base.source or base.path)
    if s.sign < 0:
        raise LoraToolError(f"{where}: unmerge from a GGUF model is not supported (its "
                            "quantization lost the bits that would come back); keep the base "
                            "model, or unmerge in the transformers model")
    if out.suffix != ".gguf":
        raise LoraToolError(f"-o {out}: a merge into a GGUF model writes one .gguf file; name "
                            "it so")
    check_output(out, inputs, s.force)
    arch = Arch.of_header(base.gguf, where)
    for p in parts:
        require_lora(p.adapter, p.spec, "a GGUF merge takes LoRA modules only")
    renamed = [_llama_cpp_named(p.adapter, arch, base, p.spec) for p in parts]
    adapters = [ad for ad, _ in renamed]
    copies = [c for _, cs in renamed for c in cs]
    inert: list[str] = []
    edits, order = plan_edits(base, adapters, [p.weight for p in parts],
                              [p.spec for p in parts], inert=inert)
    if any(n != src for n, src in order):
        raise LoraToolError("--untie does not apply to GGUF models")
    quant = s.quant
    if quant is not None and quant not in QUANTIZE:
        raise LoraToolError(f"--quant {quant}: loratool writes {', '.join(QUANTIZE)}")
    types = {}
    for name, e in edits.items():
        info = base.info(name)
        t = quant or info.dtype
        if t not in QUANTIZE:
            raise FormatError(f"{name} is {info.dtype}, which loratool can read but not write: "
                              f"pass --quant with one of {', '.join(QUANTIZE)} (Q8_0 keeps the "
                              "most of the adapter's change)")
        byte_size(info.shape, t)  # a row of partial blocks: refused before any work
        if e.full is not None and tuple(e.full[0].shape) != info.shape:
            raise FormatError(f"{name}: a resized tensor cannot be merged into a GGUF model")
        types[name] = t
    im = read_imatrix(Path(s.imatrix)) if s.imatrix is not None else None
    importance = importance_of(im, base, types) if im is not None else {}
    changed, checked = _write(base, edits, types, importance, out, inputs, s)
    return GgufMergeReport(
        operation="merge", base=where, output=str(out), format="gguf", adapters=named(parts),
        quant=quant, changed=changed, tensors=len(base.tensors),
        unchanged_copied=len(base.tensors) - len(changed),
        max_error_vs_change=max((c.error_vs_change for c in changed), default=0.0),
        seconds=time.perf_counter() - t0, inert_modules=inert, verify=checked,
        base_copies_left_out=copies or None,
        imatrix=imatrix_note(base.gguf, types) if im is None else None,
        imatrix_used=None if im is None else imatrix_use(im, types, importance))


def _llama_cpp_named(ad: LoraAdapter, arch: Arch, base: Checkpoint, spec: str
                     ) -> tuple[LoraAdapter, list[str]]:
    """An adapter named as llama.cpp names the model's tensors, and the full tensors left out
    as copies of the base's own."""

    if ad.naming == "gguf":
        return ad, []
    tied = "output.weight" not in base.tensors
    if tied and any(m.name.endswith("lm_head") or m.layout == "embedding"
                    for m in ad.modules.values()):
        raise FormatError(f"{spec}: changes the token embeddings or the head, which this GGUF "
                          "model ties (it has no output.weight): merge into the transformers "
                          "model instead")
    copies = _base_copies(ad, arch, base)
    if ad.full:
        raise prechecks.gguf_merge_full(spec, list(ad.full))
    return to_gguf(ad, arch), copies


def _base_copies(ad: LoraAdapter, arch: Arch, base: Checkpoint) -> list[str]:
    """Take out the full tensors that are the base's own (PEFT saves a copy of every module
    in modules_to_save, trained or not): each one that, written in the GGUF tensor's type
    with ggml's quantizer, gives its very bytes. Their names, as llama.cpp names them."""
    same = []
    for name, t in list(ad.full.items()):
        g = tensor_name(arch, name)
        info = base.tensors.get(g) if g is not None else None
        if info is None or info.shape != tuple(t.shape) or info.dtype not in QUANTIZE:
            continue
        if quantize(t.to(torch.float32), info.dtype) == bytes(read_tensor_bytes(info)):
            del ad.full[name]
            same.append(g)
    return same


Row = tuple[TensorInfo, str, int, int]  # a tensor's info, type, offset in the data, bytes


def _layout(base: Checkpoint, types: dict[str, str]) -> tuple[list[Row], int]:
    """Each output tensor's (info, type, offset in the data, bytes), and the data's size."""

    assert base.gguf is not None
    align = base.gguf.alignment
    rows, offset = [], 0
    for info in base.gguf.infos:
        t = types.get(info.name, info.dtype)
        n = byte_size(info.shape, t) if info.name in types else info.nbytes
        rows.append((info, t, offset, n))
        offset += n + padding(n, align)
    return rows, offset


def _write(base: Checkpoint, edits: dict[str, Edit], types: dict[str, str],
           importance: dict[str, torch.Tensor], out: Path, inputs: list[Path], s: MergeSettings
           ) -> tuple[list[GgufChange], GgufVerify | None]:

    h = base.gguf
    assert h is not None
    bufs = Buffers()  # the products' buffers, reused from tensor to tensor
    # K-quant blocks quantized side by side (numerics.device.quant_workers_count says how many)
    workers = quant_workers_count(s.options)
    rows, total = _layout(base, types)
    stats: list[GgufChange] = []
    written: dict[str, bytes] = {}  # digests of what was meant to be written (--verify)
    checked: GgufVerify | None = None
    verify, progress = s.verify, s.progress
    with Stage(out, inputs, s.force, file=out.name, options=s.options) as stage:
        assert stage.tmp is not None
        try:
            # front to back past the page cache, written while the next tensor is merged
            with SequentialWriter(stage.tmp / out.name, direct=s.options.direct_io) as f:
                f.write(_header(h, rows))  # magic, counts, KV
                for info, t, off, _ in rows:
                    f.write(tensor_info_bytes(info.name, info.shape, t, off))
                f.write(b"\0" * padding(f.size, h.alignment))
                start = f.size
                with progress.bar("merge", total=total, unit="B") as bar:
                    for info, t, off, n in rows:
                        f.write(b"\0" * (start + off - f.size))
                        if info.name in edits:
                            digest = hashlib.blake2b(digest_size=16)

                            def sink(data: bytes) -> None:
                                f.write(data)
                                if verify:
                                    digest.update(data)

                            stats.append(merged_tensor(base, info, edits[info.name], t,
                                                       s.device, sink, bufs,
                                                       importance.get(info.name), workers))
                            written[info.name] = digest.digest()
                        else:
                            digest = _copy(info, f, verify)
                            if digest is not None:
                                written[info.name] = digest
                        bar.update(n)
                f.write(b"\0" * padding(f.size - start, h.alignment))
        except OSError as e:
            raise output_os_error(out, e) from e
        if verify:  # read the file back as llama.cpp will: only a checked output is published
            checked = _verify(stage.tmp / out.name, rows, written)
        stage.publish()
    return stats, checked


# llama.cpp's general.file_type of a model whose layers are mostly of a type loratool writes
MOSTLY = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
          "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32}
FILE_TYPE = "general.file_type"


def _main_type(rows: list[Row], written: bool) -> str | None:
    """The type most values of the layers' matrices (``blk.*``, 2-D and up) have, as written
    (or, ``written`` False, as they were): what llama.cpp's file type names."""
    counts: Counter[str] = Counter()
    for info, t, _, _ in rows:
        if info.name.startswith("blk.") and len(info.shape) >= 2:
            counts[t if written else info.dtype] += math.prod(info.shape)
    return counts.most_common(1)[0][0] if counts else None


def _header(h: GgufHeader, rows: list[Row]) -> bytes:
    """The base's magic, counts and metadata, as they are, except a file type that --quant
    made untrue: when the re-typed tensors are now most of the layers' values, it names their
    type (MOSTLY_Q8_0 for a Q4_K_M model whose layers became Q8_0)."""
    data = bytearray(read_tensor_bytes(_span(h, 0, h.info_start)))
    before, after = _main_type(rows, False), _main_type(rows, True)
    span = h.kv_offsets.get(FILE_TYPE)
    if after != before and after in MOSTLY and span is not None:
        start, n = span
        data[start:start + n] = MOSTLY[after].to_bytes(n, "little")
    return bytes(data)


def _span(h: GgufHeader, offset: int, n: int) -> TensorInfo:
    return TensorInfo("header", "U8", (n,), n, h.path, offset)


def _copy(info: TensorInfo, f: SequentialWriter, digest: bool) -> bytes | None:
    """An unchanged tensor, byte for byte, a chunk at a time; with ``digest`` the digest of its
    bytes (for --verify)."""

    h = hashlib.blake2b(digest_size=16) if digest else None
    for chunk in _chunks(info):
        f.write(chunk)
        if h is not None:
            h.update(chunk)
    return h.digest() if h is not None else None


def _chunks(info: TensorInfo) -> Iterator[bytes]:
    for s in range(0, info.nbytes, COPY_CHUNK):
        n = min(COPY_CHUNK, info.nbytes - s)
        yield read_tensor_bytes(TensorInfo(info.name, "U8", (n,), n, info.file,
                                           info.offset + s))


def _verify(path: Path, rows: list[Row], written: dict[str, bytes]) -> GgufVerify:
    """The written file parsed afresh: every tensor where the layout put it, of its type and
    size, its bytes those computed (changed) or the input's (unchanged)."""

    h = read_header(path)
    got = {i.name: i for i in h.infos}
    for info, t, _, n in rows:
        g = got.get(info.name)
        if g is None or g.dtype != t or g.nbytes != n or g.shape != info.shape:
            raise LoraToolError(f"verify: {info.name} was not written as planned; nothing was "
                                "published")
        d = hashlib.blake2b(digest_size=16)
        for chunk in _chunks(g):
            d.update(chunk)
        if d.digest() != written[info.name]:
            raise LoraToolError(f"verify: {info.name} reads back different bytes; nothing was "
                                "published")
    return GgufVerify(tensors_checked=len(rows), metadata_keys=len(h.kv))
