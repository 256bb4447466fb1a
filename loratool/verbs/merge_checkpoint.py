"""Merge and unmerge into a model folder or a single safetensors file, streaming.

One base tensor at a time goes reader → math → writer, the next one read in a background
thread while the current one is computed and written; unchanged tensors are copied byte for
byte (in the kernel where possible). Math is float32 on the chosen device, in PEFT's order of
operations (so fp32 results equal PEFT's ``merge_and_unload`` bit for bit), rounded once to
the output dtype. DoRA norms are recorded beside the output so that unmerge can undo them, and
the base tensors that adapters replaced in full, so that unmerge gives the base back exactly.

Example::
    report = merge_into(open_checkpoint("base/"), "base/", [Part(adapter, 1.0, "adapter/")],
                        Path("merged"), [], MergeSettings(1.0, torch.device("cpu")))
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine import kernel
from ..engine.plan import Edit, plan_edits
from ..engine.record import RECORD, UnmergeRecord
from ..engine.verify import verify_output
from ..errors import FormatError
from ..headers.checkpoint import Checkpoint
from ..io.tensors import Buffers, tensor_bytes, torch_dtype
from ..io.writer import CheckpointWriter
from ..options import DTYPES
from ..progress import Progress
from ..reports.merge import (
    ExactFixes,
    MergedAdapter,
    MergeReport,
    QuantizedTensor,
    VerifyResult,
)
from .merge_settings import MergeSettings, Part, QloraPlan, peak_rss_mb

ROW_CHUNK = 1 << 18  # elements per chunk: 1 MiB of float32 stays in cache
BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a dtype's bits


def _by_rows(t: torch.Tensor, e: Edit, sign: float, out_dtype: torch.dtype, name: str,
             stats: kernel.Stats, bufs: Buffers,
             fixes: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """The CPU path of an edit that only adds: the kernel a block of rows at a time, so that
    the float32 copy, the guard and the rounding stay in cache instead of streaming whole
    float32 tensors through memory several times. ``fixes`` (a merge in the base's dtype):
    receives the flat indices where unmerge's (W + ΔW) − ΔW would not give W back, and the
    values it would give there."""
    prods = kernel.products(e, torch.device("cpu"), bufs)
    out = bufs.get("out", out_dtype, t.numel())[: t.numel()].view(t.shape)
    rows = max(1, ROW_CHUNK // max(1, t[0].numel()))
    cols = t[0].numel()
    for s in range(0, t.shape[0], rows):
        W = t[s:s + rows].to(torch.float32, copy=True)
        kernel.add_rows(W, prods, slice(s, s + rows), sign, stats)
        kernel.guard(W, out_dtype, name)  # per block: min()/max() would skip a NaN
        out[s:s + rows].copy_(W)
        if fixes is not None:  # unmerge's own steps on what was written: the same bits
            W.copy_(out[s:s + rows])  # W's buffer, done with: never the output itself
            for p in prods:  # the products as add_rows left them: scaled, weighted
                W.sub_(p.delta[s:s + rows])
            # into reused buffers: fresh memory costs a page fault per 4 KiB
            got = bufs.get("exact_got", out_dtype, W.numel())[: W.numel()]
            got.copy_(W.reshape(-1))
            mask = bufs.get("exact_mask", torch.bool, W.numel())[: W.numel()]
            bits = BITS[out_dtype.itemsize]  # bit for bit (−0 is not +0), and fast: integers
            torch.ne(got.view(bits), t[s:s + rows].reshape(-1).view(bits), out=mask)
            # numpy's flatnonzero: a third of torch's nonzero time on the CPU
            lost = torch.from_numpy(np.flatnonzero(mask.numpy()))
            if lost.numel():
                fixes.append((lost + s * cols, got[lost]))
    return out


def _cast(t: torch.Tensor, out_dtype: torch.dtype, name: str) -> torch.Tensor:
    """An unchanged or restored tensor in the output dtype, guarded as computed ones are."""
    if t.dtype == out_dtype:
        return t
    t32 = t.to(torch.float32)
    kernel.guard(t32, out_dtype, name)
    return t32.to(out_dtype)


def _restore(t: torch.Tensor, e: Edit, name: str, record: UnmergeRecord | None,
             dev: torch.device, stats: kernel.Stats) -> torch.Tensor:
    """Unmerge of a tensor an adapter replaced in full: the base tensor the merge recorded,
    after checking that merging it again gives exactly the merged tensor (else this is not
    the merge of this adapter, and the record would restore the wrong thing)."""

    original = record.load("replaced", name) if record is not None else None
    if original is None:
        raise FormatError(f"{name}: the adapter replaces it in full (modules_to_save) and the "
                          f"merged folder has no {RECORD} with the tensor it replaced: merge "
                          "with `loratool merge`, which records it, then unmerge that output "
                          "(or extract with --skip-full, so that no tensor is replaced)")
    again = kernel.merged(original.to(dev, torch.float32, copy=True), e, 1.0, dev, {}, name,
                          None, stats)
    if tuple(again.shape) != tuple(t.shape) or not torch.equal(again.to(t.dtype).cpu(), t):
        raise FormatError(f"{name}: merging the recorded base tensor with these adapters does "
                          "not give the merged tensor; unmerge exactly the adapters and "
                          "--weight values that were merged")
    return original


def _plan_shapes(base: Checkpoint, order: list[tuple[str, str]], edits: dict[str, Edit],
                 sign: float, record: UnmergeRecord | None, out_code: str | None
                 ) -> list[tuple[str, str, tuple[int, ...]]]:
    """Each output tensor's (name, dtype code, shape), known before anything is read."""
    plan = []
    for name, src in order:
        info = base.info(src)
        e = edits.get(name)
        shape = info.shape
        if e is not None and e.full is not None:
            if sign > 0:
                shape = tuple(e.full[0].shape)
            elif record is not None and record.shape("replaced", name) is not None:
                shape = record.shape("replaced", name)
        plan.append((name, _out_code(out_code, info.dtype), shape))
    return plan


def _out_code(out_code: str | None, code: str) -> str:
    """``--dtype`` applies to float tensors; integer buffers keep theirs."""
    return out_code if out_code and code in ("F32", "BF16", "F16", "F64") else code


@dataclass
class _Job:
    """One merge or unmerge: what is planned, and what happened so far."""

    base: Checkpoint
    edits: dict[str, Edit]
    order: list[tuple[str, str]]
    sign: float
    dev: torch.device
    out_code: str | None  # --dtype as a safetensors code, None to keep each tensor's
    rec: UnmergeRecord | None  # unmerge: what the merge recorded
    record: bool  # merge: write a record for unmerge
    exact: bool = True  # merge: record the values unmerge cannot recompute (with record)
    recorded: dict[str, int] = field(default_factory=lambda: {"dora_norm": 0, "replaced": 0})
    fixes: ExactFixes = field(default_factory=lambda: ExactFixes(0, 0, 0, []))
    max_abs_delta: list[float] = field(default_factory=list)  # per changed tensor
    quantized: list[QuantizedTensor] = field(default_factory=list)  # --qlora: per tensor
    bytes_in: int = 0
    stream_seconds: float = 0.0  # reading, merging and writing the tensors (what the bar shows)
    bufs: Buffers = field(default_factory=Buffers)
    read_bufs: list[Buffers] = field(default_factory=lambda: [Buffers(), Buffers()])

    def fetch(self, i: int, name: str, src: str) -> torch.Tensor | None:
        """Read the next tensor (runs in the prefetch thread: one read ahead of the math)."""

        info = self.base.info(src)
        if name in self.edits or info.offset < 0 or _out_code(self.out_code,
                                                               info.dtype) != info.dtype:
            return self.base.load(src, buffer=self.read_bufs[i % 2].get("read", torch.uint8,
                                                                        info.nbytes))
        return None  # unchanged and same dtype: copied raw, nothing to read here


def merge_into(base: Checkpoint, base_spec: str, parts: list[Part], out: Path,
               inputs: list[Path], s: MergeSettings, t0: float | None = None) -> MergeReport:
    """Merge (``s.sign`` +1) or unmerge (−1) adapters already read into one opened safetensors
    checkpoint: plan, stream, verify, publish; the report. ``t0``: when the verb began (its
    report's ``seconds`` count from there).

    ``s.record`` (merge): write what unmerge needs (replaced tensors, DoRA norms and, with
    ``s.exact``, the values unmerge cannot recompute) as ``RECORD``.
    """
    t0 = time.perf_counter() if t0 is None else t0
    inert: list[str] = []
    adapters, weights, specs = ([p.adapter for p in parts], [p.weight for p in parts],
                                [p.spec for p in parts])
    q = s.qlora
    edits, order = plan_edits(base, adapters, weights, specs, s.untie, inert,
                              q.tensors if q is not None else None)
    # a single .safetensors base and -o x.safetensors: one file out (no room for the record)
    single = Path(out).suffix == ".safetensors" and base.index is None and len(base.files) == 1
    job = _Job(base, edits, order, s.sign, s.device, DTYPES[s.dtype],
               UnmergeRecord(base) if s.sign < 0 else None, s.record and not single, s.exact)
    writer = _writer(job, out, inputs, s, base_spec, parts, single)
    verified: list[VerifyResult] = []
    if s.verify:
        def check(folder: Path) -> None:
            """Runs on the temporary folder: only a verified output is ever published."""
            verified.append(verify_output(base, folder, edits, s.sign, job.rec, s.progress))

        writer.before_publish = check
    if s.untie and any(n != src for n, src in order) and base.config is not None:
        writer.add_file("config.json", json.dumps({**base.config, "tie_word_embeddings": False},
                                                  indent=2) + "\n")
    t_stream = time.perf_counter()
    _stream(job, writer, s.progress)
    job.stream_seconds = time.perf_counter() - t_stream
    return _report(job, base_spec, parts, out, s.dtype, writer, time.perf_counter() - t0,
                   inert, verified[0] if verified else None, s.qlora)


def weights_name(base: Checkpoint) -> str:
    """The output's weights file, named as the base names its own, so that its loader finds
    it: diffusers looks for ``diffusion_pytorch_model.safetensors``, transformers for
    ``model.safetensors`` (what ``pytorch_model.bin`` becomes)."""
    first = Path(str(base.index)[: -len(".index.json")]) if base.index else (
        base.files[0] if base.files else Path("model.safetensors"))
    diffusers = first.name.split(".")[0] == "diffusion_pytorch_model"
    return ("diffusion_pytorch_model" if diffusers else "model") + ".safetensors"


def _writer(job: _Job, out: Path, inputs: list[Path], s: MergeSettings, base_spec: str,
            parts: list[Part], single: bool) -> CheckpointWriter:
    """The output, laid out up front (every byte written once), recording its inputs;
    ``single``: one .safetensors file, not a folder."""

    plan = _plan_shapes(job.base, job.order, job.edits, job.sign, job.rec, job.out_code)
    return CheckpointWriter(out, inputs=inputs, force=s.force, max_shard_size=s.max_shard_size,
                            options=s.options,
                            copy_from=None if single else job.base.folder, plan=plan,
                            filename=weights_name(job.base), single_file=single,
                            metadata={"loratool": "merge" if job.sign > 0 else "unmerge",
                                      "loratool.base": base_spec,
                                      "loratool.adapters": json.dumps(
                                          [{"adapter": p.spec, "weight": p.weight}
                                           for p in parts]),
                                      **({"loratool.qlora": s.qlora.fmt.describe()}
                                         if s.qlora is not None else {})})


def _stream(job: _Job, writer: CheckpointWriter, progress: Progress) -> None:
    """Every output tensor in order: unchanged ones copied raw, changed ones computed, the
    next one read in a background thread meanwhile."""

    order, base = job.order, job.base
    total = sum(base.info(src).nbytes for _, src in order)
    with writer as w, ThreadPoolExecutor(1) as pool, progress.bar(
            "merge" if job.sign > 0 else "unmerge", total=total, unit="B") as bar:
        pending = pool.submit(job.fetch, 0, *order[0]) if order else None
        for i, (name, src) in enumerate(order):
            t = pending.result() if pending is not None else None
            pending = (pool.submit(job.fetch, i + 1, *order[i + 1]) if i + 1 < len(order)
                       else None)
            info = base.info(src)
            job.bytes_in += info.nbytes
            odt = torch_dtype(_out_code(job.out_code, info.dtype))
            if t is None:
                info = base.local_info(src)
                w.add_raw(name, info.dtype, info.shape, info.file, info.offset, info.nbytes)
            elif name not in job.edits:
                w.add(name, _cast(t, odt, name))
            else:
                w.add(name, _edited(job, w, name, t, odt))
            bar.update(info.nbytes)


def _edited(job: _Job, w: CheckpointWriter, name: str, t: torch.Tensor, odt: torch.dtype
            ) -> torch.Tensor:
    """One changed tensor, in the output dtype: restored from the record (unmerge of a full
    replacement), by row blocks (plain LoRA on the CPU), or whole on the device."""

    e = job.edits[name]
    stats = kernel.Stats()
    norms: dict[str, torch.Tensor] = {}
    if job.sign > 0 and e.full is not None and job.record:
        w.add_side(RECORD, "replaced." + name, t)
        job.recorded["replaced"] += 1
    # values unmerge will not recompute exactly: for additions (a replaced tensor comes back
    # whole from the record; DoRA from its norms) written in the base's own dtype
    fixes: list[tuple[torch.Tensor, torch.Tensor]] | None = (
        [] if job.sign > 0 and job.record and job.exact and odt == t.dtype and e.full is None
        and e.dora is None and e.quant is None else None)
    if job.sign < 0 and e.full is not None:
        res = _cast(_restore(t, e, name, job.rec, job.dev, stats), odt, name)
    elif job.dev.type == "cpu" and kernel.is_rows_only(e) and t.dim() >= 2:
        res = _by_rows(t, e, job.sign, odt, name, stats, job.bufs, fixes)
    else:
        W = t.to(device=job.dev, dtype=torch.float32, copy=True)
        new = kernel.merged(W, e, job.sign, job.dev, norms, name, job.rec, stats, t.dtype)
        del W
        kernel.guard(new, odt, name)
        res = new.to(odt).cpu()
        del new
        if fixes is not None:  # unmerge's own computation on what was written
            try:
                back = kernel.merged(res.to(job.dev, torch.float32, copy=True), e, -1.0,
                                     job.dev, name=name)  # a copy: merged() works in place
            except FormatError:  # a multiplicative module with zeros: nothing undoes it
                job.fixes.not_applied.append(name)
                fixes = None
            else:
                got = back.to(odt).cpu().reshape(-1)
                lost = (got != t.reshape(-1)).nonzero().reshape(-1)
                if lost.numel():
                    fixes.append((lost, got[lost]))
    if job.record:
        for k, v in norms.items():
            w.add_side(RECORD, "dora_norm." + k, v)
            job.recorded["dora_norm"] += 1
    if fixes is not None:
        _record_fixes(job, w, name, t, fixes)
    elif job.sign < 0 and job.rec is not None and e.full is None:
        _apply_fixes(job, name, res)
    job.max_abs_delta.append(stats.max_abs_delta or 0.0)
    if stats.quant_norms is not None:
        job.quantized.append(QuantizedTensor(name, *stats.quant_norms))
    return res


def _record_fixes(job: _Job, w: CheckpointWriter, name: str, base: torch.Tensor,
                  lost: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record where unmerge would not give the base back: the flat indices, the base's
    values there, and a digest of what unmerge will compute there (so that it puts them back
    only after the same merge's unmerge)."""
    job.fixes.changed_values += base.numel()
    if not lost:
        return
    idx = torch.cat([i for i, _ in lost])
    found = torch.cat([v for _, v in lost])
    index = idx.to(torch.int32 if base.numel() < 2**31 else torch.int64)
    values = base.reshape(-1)[idx].contiguous()
    w.add_side(RECORD, "exact_index." + name, index)
    w.add_side(RECORD, "exact_value." + name, values)
    w.add_side(RECORD, "exact_check." + name, _digest(found))
    job.fixes.values += idx.numel()
    job.fixes.bytes += index.numel() * index.element_size() + values.numel() * \
        values.element_size() + 16


def _digest(t: torch.Tensor) -> torch.Tensor:
    h = hashlib.blake2b(tensor_bytes(t.contiguous()), digest_size=16).digest()
    return torch.frombuffer(bytearray(h), dtype=torch.uint8)


def _apply_fixes(job: _Job, name: str, res: torch.Tensor) -> None:
    """Unmerge: put back the values the merge recorded, where what was computed there is
    what the merge foresaw (else the unmerge is not that merge's: left as computed)."""
    assert job.rec is not None
    index = job.rec.load("exact_index", name)
    if index is None:
        return
    idx = index.to(torch.int64)
    flat = res.reshape(-1)
    check = job.rec.load("exact_check", name)
    values = job.rec.load("exact_value", name)
    if check is None or values is None or values.dtype != res.dtype or idx.numel() != \
            values.numel() or (idx.numel() and int(idx.max()) >= flat.numel()) or \
            not torch.equal(_digest(flat[idx]), check):
        job.fixes.not_applied.append(name)
        return
    flat[idx] = values
    job.fixes.values += idx.numel()
    job.fixes.changed_values += res.numel()


def _report(job: _Job, base_spec: str, parts: list[Part], out: Path, dtype: str,
            writer: CheckpointWriter, elapsed: float, inert: list[str],
            verified: VerifyResult | None, qlora: QloraPlan | None = None) -> MergeReport:
    dev = job.dev
    return MergeReport(
        operation="merge" if job.sign > 0 else "unmerge", base=base_spec,
        adapters=[MergedAdapter(p.spec, p.weight, len(p.adapter.modules), len(p.adapter.full),
                                p.adapter.source_format) for p in parts],
        output=str(out), device=str(dev), dtype=dtype, tensors=len(job.order),
        tensors_changed=len(job.max_abs_delta),
        max_abs_delta=max(job.max_abs_delta, default=0.0),
        dora_norms_recorded=job.recorded["dora_norm"],
        replaced_recorded=job.recorded["replaced"],
        record=RECORD if any(job.recorded.values()) or job.fixes.values and job.sign > 0
        else None,
        not_copied=writer.not_copied, seconds=elapsed, stream_seconds=job.stream_seconds,
        # the rate of the stream itself, as its bar shows it (reading the adapters, planning
        # and start-up are in "seconds", not here)
        gb_per_s=job.bytes_in / 1e9 / job.stream_seconds if job.stream_seconds > 0 else None,
        bytes=job.bytes_in, peak_rss_mb=peak_rss_mb(), inert_modules=inert,
        peak_gpu_mb=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
        else None,
        verify=verified,
        exact=job.fixes if job.fixes.values or job.fixes.not_applied or (
            job.sign > 0 and job.record and job.exact and job.fixes.changed_values) else None,
        qlora=qlora.report(job.quantized) if qlora is not None else None)
