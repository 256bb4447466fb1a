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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..engine import kernel
from ..engine.plan import Edit, plan_edits
from ..errors import FormatError, LoraToolError
from ..formats import require_lora
from ..formats.gguf_names import Arch, tensor_name, to_gguf
from ..headers.checkpoint import Checkpoint
from ..headers.gguf import QUANTIZE, GgufHeader, byte_size, padding, read_header, tensor_info_bytes
from ..headers.safetensors import TensorInfo, read_tensor_bytes
from ..io.directio import SequentialWriter
from ..io.imatrix import Imatrix, describe, read_imatrix
from ..io.staging import Stage, check_output, output_os_error
from ..io.tensors import Buffers
from ..model.adapter import LoraAdapter
from ..numerics.kquants import QUANTIZERS as K_QUANTS
from ..numerics.ops import sum_squares
from ..numerics.quant import dequantize, quantize
from ..reports.merge import GgufChange, GgufMergeReport, GgufVerify, ImatrixUse
from . import prechecks
from .merge_settings import MergeSettings, Part, named

COPY_CHUNK = 8 << 20  # unchanged tensors are copied this many bytes at a time
QUANT_CHUNK = 1 << 18  # values quantized at a time (1 MiB of float32: stays in cache)


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
    importance = _importance(im, base, types) if im is not None else {}
    changed, checked = _write(base, edits, types, importance, out, inputs, s)
    return GgufMergeReport(
        operation="merge", base=where, output=str(out), format="gguf", adapters=named(parts),
        quant=quant, changed=changed, tensors=len(base.tensors),
        unchanged_copied=len(base.tensors) - len(changed),
        max_error_vs_change=max((c.error_vs_change for c in changed), default=0.0),
        seconds=time.perf_counter() - t0, inert_modules=inert, verify=checked,
        base_copies_left_out=copies or None,
        imatrix=_imatrix(base.gguf, types) if im is None else None,
        imatrix_used=None if im is None else _use(im, types, importance))


# what llama-quantize quantizes with an importance matrix by its own routine that loratool
# does not have (Q8_0, F16, BF16 and F32 ignore the matrix in ggml; the K-quants use it here)
WEIGHTED_ELSEWHERE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _importance(im: Imatrix, base: Checkpoint, types: dict[str, str]
                ) -> dict[str, torch.Tensor]:
    """Each changed K-quant tensor's importance ([experts, 1, columns]) where the file has
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
                              "(it does for the K-quants); leave out --imatrix, or pass "
                              "--quant Q4_K (or Q8_0)")
        if t in K_QUANTS:
            out[name] = entry
    return out


def _use(im: Imatrix, types: dict[str, str], importance: dict[str, torch.Tensor]
         ) -> ImatrixUse:
    """What the report says of the importance matrix given."""
    quantized = [n for n, t in types.items() if t in K_QUANTS]
    return ImatrixUse(file=describe(im), used=sorted(importance),
                      no_entry=sorted(n for n in quantized if n not in importance),
                      not_weighted=sorted(n for n, t in types.items() if t not in K_QUANTS))


IMATRIX = "quantize.imatrix."  # what llama-quantize records of the importance matrix it used


def _imatrix(h: GgufHeader, types: dict[str, str]) -> str | None:
    """What to say when the base was quantized with an importance matrix (its metadata says
    so) and changed tensors were re-quantized without one; None otherwise."""
    quantized = sum(1 for t in types.values() if t not in ("F32", "F16", "BF16"))
    keys = {k[len(IMATRIX):]: v for k, v in h.kv.items() if k.startswith(IMATRIX)}
    if not keys or not quantized:
        return None
    what = ", ".join(f"{k} {v}" for k, v in keys.items() if k in ("file", "chunks_count"))
    return (f"the base was quantized with an importance matrix ({what or 'quantize.imatrix.*'}"
            f"); the {quantized} re-quantized tensor(s) were quantized without one, as "
            "llama-quantize does without --imatrix")


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

                            stats.append(_merged(base, info, edits[info.name], t, s.device,
                                                 sink, bufs, importance.get(info.name)))
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


def _merged(base: Checkpoint, info: TensorInfo, edit: Edit, type_name: str,
            device: torch.device, sink: Callable[[bytes], None], bufs: Buffers,
            importance: torch.Tensor | None = None) -> GgufChange:
    """One changed tensor: dequantized, merged in float32 by the kernel, quantized, handed to
    ``sink`` a block of rows at a time; what that cost. An edit that only adds runs on the
    CPU a block of rows at a time from the quantized bytes (the products whole, as for a
    safetensors merge: the same bits); anything else (DoRA, biases, a full tensor, a GPU)
    merges the whole tensor first. ``importance``: the columns' weights per expert
    ([experts, 1, columns]) for a K-quant quantized as with an importance matrix."""
    sq = _Squares()
    n_rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1

    def weights(r: int, r1: int) -> torch.Tensor | None:  # rows r…r1's importance
        if importance is None:
            return None
        per_expert = n_rows // importance.shape[0]
        return importance[torch.arange(r, r1) // per_expert, 0]

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
            sink(_quantized(M, W, type_name, info, sq, weights(r, r1)))
    else:
        W = base.load(info.name).to(device=device, dtype=torch.float32)
        merged = kernel.merged(W.clone(), edit, 1.0, device, name=info.name, stats=stats).cpu()
        W = W.cpu()
        m2 = merged.reshape(merged.shape[0], -1) if merged.dim() > 1 else merged.reshape(1, -1)
        w2 = W.reshape(m2.shape)
        step = max(1, QUANT_CHUNK // max(1, m2.shape[1]))
        for r in range(0, m2.shape[0], step):
            r1 = min(r + step, m2.shape[0])
            sink(_quantized(m2[r:r1], w2[r:r1], type_name, info, sq, weights(r, r1)))
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
    if not bool(torch.isfinite(back).all()):  # a float16 scale overflowed: llama.cpp refuses it
        raise _overflow(info.name, type_name, M, importance)
    sq.error += sum_squares(back.float().sub_(M))
    sq.change += sum_squares(M - W)
    sq.result += sum_squares(M)
    sq.base += sum_squares(W)
    return data
