"""``loratool extract``: a LoRA adapter from a fine-tuned model, with its error measured.

Streams over base and tuned tensor by tensor: ΔW = W_tuned − W_base in float32, factorised by
a randomized SVD (an exact one with ``exact_svd``) at the rank a policy chooses, the error of
the stored factors measured, not estimated. Unchanged tensors are skipped; embeddings and
lm_head are stored in full (``modules_to_save``) unless ``embed_lora``; changed norms are
stored in full (or dropped with ``skip_full``); bias changes of factorised modules become
``lora_B.bias``.

Example::
    report = extract("base/", "tuned/", "adapter/", policy=RankPolicy.rank(16))
    report.totals.max_rel_error
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.deltas import diffs, matrix
from ..errors import FormatError, LoraToolError
from ..formats import lossy, output_format, write_adapter
from ..headers import changes, moe
from ..headers.changes import input_embedding, pairs, ties_embeddings
from ..headers.checkpoint import Checkpoint
from ..headers.peft_config import task_type_for
from ..headers.safetensors import TensorInfo
from ..io.staging import REPORT_OUTPUT, Stage, check_output, output_os_error
from ..io.tensors import open_checkpoint, torch_dtype
from ..model import experts
from ..model.adapter import LoraAdapter, LoraModule, add_head_mirror
from ..numerics import ops
from ..numerics.device import resolve_device
from ..numerics.lowrank import (
    BudgetItem,
    Factored,
    allocate,
    factorize,
    module_seed,
    spectrum,
    spectrum_cap,
)
from ..options import DTYPES, Fixed, Options, RankPolicy, check_dtype, check_fixed
from ..progress import SILENT, Progress
from ..reports.extract import ExtractedModule, ExtractReport, ExtractTotals
from ..units import human_bytes


@dataclass
class _Factorised:
    """A module's report entry, and what the adapter is built from."""

    entry: ExtractedModule
    factors: Factored
    shape: tuple[int, ...]


@dataclass
class _Job:
    """One extract run: the inputs, the options, and what the scan has found so far."""

    base: Checkpoint
    tuned: Checkpoint
    dev: torch.device
    policy: RankPolicy
    dtype: str
    exact: bool
    seed: int
    embed_lora: bool
    skip_full: bool
    model_type: str | None
    embedding: str | None  # the input embedding of a tied base: the head gets its change too
    fmt: str = "peft"
    modules: list[_Factorised] = field(default_factory=list)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # bias name -> delta
    dropped: list[str] = field(default_factory=list)
    skipped: int = 0
    items: list[BudgetItem] = field(default_factory=list)  # per module (a budget only)
    pending: list[tuple[str, str, float]] = field(default_factory=list)  # (name, kind, rel)
    fixed: list[Fixed] = field(default_factory=list)  # written whatever the ranks
    over: bool = False  # what is written whatever the ranks exceeds the budget: count only
    # per-expert tensors of fused parameters: tensor → (parameter, expert, row block); the
    # row blocks of one expert wait here until its matrix is whole
    expert_of: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    expert_sources: dict[str, list[str]] = field(default_factory=dict)  # "param[e]" → tensors
    expert_layouts: dict[str, tuple[str, int]] = field(default_factory=dict)
    # an expert's row blocks seen so far: block → (ΔW rows, ‖W rows‖²)
    waiting: dict[str, dict[int, tuple[torch.Tensor, float]]] = field(default_factory=dict)

    def store_dtype(self, code: str) -> torch.dtype:
        return torch_dtype(DTYPES[self.dtype] or code)

    def cost(self, numel: int, code: str) -> int:
        """What ``numel`` values stored from a tensor of dtype ``code`` take of the budget."""
        b = self.policy.budget
        return b.cost(numel, self.store_dtype(code).itemsize) if b else 0

    def fix(self, label: str, numel: int, code: str, hint: str | None) -> None:
        """Count something written whatever the ranks. Once that exceeds the budget, no more
        factorising: the scan only goes on counting, so that the refusal gives the whole
        fixed cost, not the part found so far."""
        if self.policy.budget is not None:
            self.fixed.append(Fixed(label, self.cost(numel, code), hint))
            self.over = self.over or sum(f.cost for f in self.fixed) > self.policy.budget.amount


def extract(base: str | os.PathLike[str], tuned: str | os.PathLike[str],
            out: str | os.PathLike[str], *, policy: RankPolicy | None = None,
            targets: list[str] | None = None, excludes: list[str] | None = None,
            device: str = "auto", fmt: str | None = None, exact_svd: bool = False,
            embed_lora: bool = False, skip_full: bool = False, seed: int = 0,
            dtype: str = "keep", force: bool = False,
            report_path: str | os.PathLike[str] | None = None,
            options: Options | None = None, progress: Progress = SILENT) -> ExtractReport:
    """Extract a LoRA adapter from the difference ``tuned`` − ``base``, factorised at the ranks
    ``policy`` chooses (default rank 16), into ``out`` (a PEFT folder; ``fmt`` or the suffix:
    kohya ``.safetensors``, ``.gguf``). The errors reported are measured on the written
    factors. ``report_path``: also write the report as JSON there.

    Example::

        policy = RankPolicy.from_options(rank=None, energy=0.9, max_error=None, budget=None)
        report = loratool.extract("base/", "tuned/", "adapter/", policy=policy)
        for m in report.modules:
            print(m.name, m.rank, m.rel_error)
    """

    t0 = time.perf_counter()
    policy = policy or RankPolicy.rank(16)
    base_spec, tuned_spec, out = os.fspath(base), os.fspath(tuned), Path(out)
    report_file = Path(report_path) if report_path is not None else None
    fmt = output_format(out, fmt, "peft", ("peft", "kohya", "gguf"))
    check_dtype(dtype)
    dev = resolve_device(device)
    base_ck = open_checkpoint(base_spec, progress)
    tuned_ck = open_checkpoint(tuned_spec, progress)
    names = pairs(base_ck, tuned_ck, list(targets or []), list(excludes or []))
    cfg = tuned_ck.config or base_ck.config or {}
    inputs = [p for p in (Path(base_spec), Path(tuned_spec)) if p.exists()]
    _check_outputs(out, report_file, inputs, force)
    tied = ties_embeddings(cfg, base_ck.tensors)
    model_type = cfg.get("model_type")
    job = _Job(base_ck, tuned_ck, dev, policy, dtype, exact_svd, seed, embed_lora, skip_full,
               model_type if isinstance(model_type, str) else None,
               input_embedding(base_ck.tensors) if tied else None, fmt)
    _find_experts(job, names)
    with progress.bar("extract", total=len(names), unit="tensor") as bar:
        for name, w_base, delta, raw_tuned in diffs(job.base, job.tuned, names, job.dev, bar):
            _take(job, name, w_base, delta, raw_tuned)
    check_fixed(policy, job.fixed)  # the whole fixed cost, now that every tensor is seen
    if policy.kind == "budget":
        _at_budget_ranks(job, progress)
    ad = _adapter(job, base_spec, cfg, tied)
    report = _report(job, base_spec, tuned_spec, out, fmt, ad, time.perf_counter() - t0)
    if report_file is None:
        _write(ad, out, fmt, report, base_spec, force, inputs, options)
    else:  # staged first (a full disk fails before the adapter appears), published after it

        with Stage(report_file, inputs + [out], force, file=report_file.name,
                   kind=REPORT_OUTPUT, options=options) as stage:
            assert stage.tmp is not None
            try:
                (stage.tmp / report_file.name).write_text(report.to_json() + "\n")
            except OSError as e:
                raise output_os_error(report_file, e) from e
            _write(ad, out, fmt, report, base_spec, force, inputs, options)
            stage.publish()
    report.seconds = time.perf_counter() - t0
    return report


def _check_outputs(out: Path, report_path: Path | None, inputs: list[Path], force: bool
                   ) -> None:
    """Fail before the work, not after it."""

    check_output(out, inputs, force)
    if report_path is not None:
        check_output(report_path, inputs + [out], force, REPORT_OUTPUT)
        if not report_path.parent.is_dir():
            raise LoraToolError(f"--report {report_path}: folder {report_path.parent} does not "
                                "exist")


def _take(job: _Job, name: str, w_base: torch.Tensor | None, delta: torch.Tensor | None,
          raw_tuned: torch.Tensor | None) -> None:
    """Decide how one tensor is stored: skipped, in full, as a bias change, or factorised (now,
    or after the budget is split)."""

    ti = job.tuned.info(name)
    if w_base is None and delta is None:
        job.skipped += 1
        return
    if w_base is None:  # resized: the tuned tensor, whatever the ranks
        job.full[name] = delta.to(job.store_dtype(ti.dtype))
        job.fix(changes.RESIZED, delta.numel(), ti.dtype, None)
        return
    if name in job.expert_of:  # one block of an expert's matrix
        _take_expert_block(job, name, w_base, delta)
        return
    delta_sq = ops.sum_squares(delta)  # ΔW is finite (diffs checked): 0 only when all zero
    if not delta_sq:
        job.skipped += 1
        return
    kind = changes.kind(name, ti.shape, job.model_type, job.embed_lora)
    if kind == "full":
        _take_full(job, name, delta, raw_tuned, ti)
        return
    if moe.is_experts(kind):  # a fused parameter as stored: one matrix per expert
        job.expert_layouts[name] = (kind, delta.shape[0])
        for e in range(delta.shape[0]):
            key = f"{name}[{e}]"
            job.expert_sources[key] = [name]
            M = delta[e] if kind == "experts" else delta[e].T
            if bool(M.any()):
                rel = math.sqrt(ops.sum_squares(M) / (ops.sum_squares(w_base[e]) or math.inf))
                _factor_or_wait(job, key, "linear", M, rel, ti, M)
        return
    base_sq = ops.sum_squares(w_base)
    rel_w = math.sqrt(delta_sq / base_sq) if base_sq else math.inf
    _factor_or_wait(job, name, kind, matrix(delta, kind), rel_w, ti, delta, delta_sq)


def _factor_or_wait(job: _Job, name: str, kind: str, M: torch.Tensor, rel_w: float,
                    ti: TensorInfo, delta: torch.Tensor, total_sq: float | None = None
                    ) -> None:
    """Factorise now, or (a budget) keep the spectrum and factorise at the budget's rank."""
    if job.over:  # the budget is already exceeded by what is stored in full: only counting
        return
    if job.policy.kind == "budget":
        # pass 1 of 2: only the spectrum, up to the cap; factors come in pass 2
        cap = spectrum_cap(job.policy, min(M.shape))
        _, S, _, _ = spectrum(M, cap, job.exact, module_seed(job.seed, name))
        mirrors = 2 if name == job.embedding else 1  # the tied head's copy costs as much
        group = name.rpartition("[")[0] if name in job.expert_sources else None
        job.items.append(BudgetItem(name, S[:cap].cpu(),
                                    job.cost(sum(M.shape), ti.dtype) * mirrors, cap,
                                    group=group))
        job.pending.append((name, kind, rel_w))
        return
    f = factorize(M, job.policy, exact=job.exact, seed=module_seed(job.seed, name),
                  store_dtype=job.store_dtype(ti.dtype), name=name, total_sq=total_sq)
    job.modules.append(_module_entry(name, kind, f, rel_w, ti, delta))


def _take_full(job: _Job, name: str, delta: torch.Tensor, raw_tuned: torch.Tensor,
               ti: TensorInfo) -> None:
    """A changed tensor that is not LoRA-able: a bias change, or the tuned tensor in full."""
    if name.endswith(".bias"):
        job.biases[name] = delta.to("cpu", copy=True)  # delta's buffer serves the next one
        job.fix(changes.BIAS_CHANGES, delta.numel(), ti.dtype, None)
        return
    if job.skip_full:
        job.dropped.append(name)
        return
    job.full[name] = raw_tuned.to("cpu", job.store_dtype(ti.dtype), copy=True)  # tuned values
    label, hint = changes.stored_in_full(name, job.embed_lora)
    copies = 2 if name == job.embedding else 1  # a tied head carries a copy
    for _ in range(copies):
        job.fix(label, delta.numel(), ti.dtype, hint)


def _at_budget_ranks(job: _Job, progress: Progress) -> None:
    """Pass 2 of a budget: split it across the modules, then factorise each at its rank."""

    chosen = allocate(job.policy, job.items, job.fixed)
    with progress.bar("extract at the budget's ranks", total=len(job.pending),
                      unit="tensor") as bar:
        for name, kind, rel_w in job.pending:  # the same SVDs, at the chosen ranks
            bar.update(1)
            sources = job.expert_sources.get(name, [name])
            ti = job.tuned.info(sources[0])
            delta = torch.cat([job.tuned.load(n, device=job.dev, dtype=torch.float32).sub_(
                job.base.load(n, device=job.dev, dtype=torch.float32)) for n in sources])
            if name not in sources and len(ti.shape) == 3:  # "param[e]" of a stored 3-D one
                layout = job.expert_layouts[sources[0]][0]
                delta = delta[int(name.rpartition("[")[2][:-1])]
                delta = delta if layout == "experts" else delta.T
            f = factorize(matrix(delta, kind), job.policy, exact=job.exact,
                          seed=module_seed(job.seed, name),
                          store_dtype=job.store_dtype(ti.dtype), rank=chosen[name], name=name)
            job.modules.append(_module_entry(name, kind, f, rel_w, ti, delta))


def _find_experts(job: _Job, names: list[str]) -> None:
    """Per-expert tensors that transformers fuses into 3-D parameters (PEFT adapts those):
    each expert's gate and up rows become one matrix, factorised as ``param[e]``."""

    if job.model_type not in moe.FUSING_TYPES:
        return
    for param, items in moe.group(names).items():
        n = max(e for e, _, _ in items) + 1
        job.expert_layouts[param] = ("experts", n)
        for e, tensor, block in items:
            job.expert_of[tensor] = (param, e, block)
            job.expert_sources.setdefault(f"{param}[{e}]", []).append(tensor)


def _take_expert_block(job: _Job, name: str, w_base: torch.Tensor | None,
                       delta: torch.Tensor | None) -> None:
    """Keep one block of an expert's matrix; factorise the matrix once it is whole."""

    param, e, block = job.expert_of[name]
    key = f"{param}[{e}]"
    have = job.waiting.setdefault(key, {})
    shape = job.tuned.info(name).shape
    # unchanged blocks are zeros: the expert's matrix is what transformers fuses
    have[block] = ((delta.clone() if delta is not None else torch.zeros(shape, device=job.dev)),
                   ops.sum_squares(w_base) if w_base is not None else ops.sum_squares(
                       job.base.load(name, dtype=torch.float32)))
    if len(have) < len(job.expert_sources[key]):
        return
    parts = [have[b] for b in sorted(have)]
    del job.waiting[key]
    M = torch.cat([d for d, _ in parts])
    if not bool(M.any()):
        job.skipped += len(parts)
        return
    w_sq = sum(w for _, w in parts)
    rel_w = math.sqrt(ops.sum_squares(M) / w_sq) if w_sq else math.inf
    _factor_or_wait(job, key, "linear", M, rel_w, job.tuned.info(name), M)


def _adapter(job: _Job, base_spec: str, cfg: dict[str, object], tied: bool) -> LoraAdapter:
    """The LoraAdapter: factorised modules, bias changes, full tensors, the tied head's copy."""

    ad = LoraAdapter(base_model=base_spec, source_format="extract",
                     task_type=task_type_for(cfg.get("architectures")), tie_embeddings=tied)
    for done in job.modules:
        f, shape, layout = done.factors, done.shape, done.entry.layout
        if f.rank == 0:
            continue
        A, B = f.A, f.B
        if layout == "conv":
            A = A.reshape(f.rank, *shape[1:])
            B = B.reshape(shape[0], f.rank, *[1] * (len(shape) - 2))
        ad.add(LoraModule(done.entry.name, A.cpu(), B.cpu(), float(f.rank), False, layout))
    # PEFT's lora_bias is one flag for the whole adapter and refuses embedding modules: with
    # embedding LoRA, bias changes are stored as the tuned biases in full instead; kohya and
    # GGUF hold no biases at all, so --skip-full leaves them out there
    lora_bias = not any(m.layout == "embedding" for m in ad.modules.values())
    for bname, d in job.biases.items():
        mod = bname[: -len(".bias")]
        if job.skip_full and job.fmt != "peft":
            job.dropped.append(bname)
        elif mod in ad.modules and lora_bias:
            ad.modules[mod].bias = d.to(ad.modules[mod].A.dtype)  # scale 1: b' = b + Δb
        elif job.skip_full:
            job.dropped.append(bname)
        else:
            job.full[bname] = job.tuned.load(bname).to(
                job.store_dtype(job.tuned.info(bname).dtype))
    ad.full = job.full
    if job.embedding is not None:
        add_head_mirror(ad, job.embedding)
    experts.implode(ad, job.expert_layouts)
    if job.model_type in moe.RENAMES:  # PEFT names modules as transformers 5 does
        ad.modules = {moe.in_memory(k, job.model_type): m for k, m in ad.modules.items()}
        for m in ad.modules.values():
            m.name = moe.in_memory(m.name, job.model_type)
        ad.full = {moe.in_memory(k, job.model_type): t for k, t in ad.full.items()}
    return ad


def _module_entry(name: str, kind: str, f: Factored, rel_w: float, ti: TensorInfo,
                  delta: torch.Tensor) -> _Factorised:
    assert f.spectrum is not None
    # the same measures `loratool analyze` gives, from the singular values computed here
    analysis = ops.spectrum_measures(f.spectrum, f.norm ** 2, (0.5, 0.9, 0.99))
    entry = ExtractedModule(name=name.removesuffix(".weight"), tensor=name, layout=kind,
                            rank=f.rank, full_rank=f.full_rank, rel_error=f.rel_error,
                            kept_energy=f.kept_energy, delta_norm=f.norm, rel_delta=rel_w,
                            shape=list(delta.shape), svd=f.svd, analysis=analysis)
    return _Factorised(entry, f, tuple(delta.shape))


def _report(job: _Job, base: str, tuned: str, out: Path, fmt: str, ad: LoraAdapter,
            seconds: float) -> ExtractReport:
    modules = [done.entry for done in job.modules]
    tot_sq = sum(m.delta_norm ** 2 for m in modules)
    err_sq = sum((m.rel_error * m.delta_norm) ** 2 for m in modules)
    nbytes = ad.num_bytes()
    totals = ExtractTotals(lora_modules=len(ad.modules), parameters=ad.num_params(),
                           bytes=nbytes,
                           max_rel_error=max((m.rel_error for m in modules), default=0.0),
                           total_rel_error=math.sqrt(err_sq / tot_sq) if tot_sq else 0.0,
                           ranks=sorted({m.rank for m in modules}))
    return ExtractReport(
        base=base, tuned=tuned, output=str(out), format=fmt, policy=job.policy.describe(),
        seed=job.seed, svd="exact" if job.exact else "randomized", device=str(job.dev),
        modules=modules, full_tensors=sorted(ad.full), dropped=job.dropped,
        bias_deltas=sorted(m.name + ".bias" for m in ad.modules.values() if m.bias is not None),
        unchanged_tensors=job.skipped, totals=totals, notes=_notes(job, modules, nbytes),
        seconds=seconds)


def _notes(job: _Job, modules: list[ExtractedModule], nbytes: int) -> list[str]:
    """What a user should know about the result: ranks capped, factors larger than the
    matrices they replace, an adapter larger than the model."""

    notes = []
    p = job.policy
    capped = [m for m in modules if p.kind == "rank" and m.full_rank < p.value]
    if capped:
        notes.append(f"--rank {int(p.value)} is above the full rank of {len(capped)} "
                     f"module(s) (e.g. {capped[0].name}: {capped[0].full_rank}); they "
                     "are stored at full rank, exactly")
    big = [m for m in modules if m.rank and m.rank * (
        m.shape[0] + math.prod(m.shape[1:])) >= math.prod(m.shape)]
    if big:
        notes.append(f"{len(big)} module(s) (e.g. {big[0].name}, rank {big[0].rank}) "
                     "hold more values in their two factors than the matrix itself: at these "
                     "ranks LoRA saves nothing on them")
    model = job.tuned.total_bytes
    if nbytes > model:
        notes.append(f"the adapter ({human_bytes(nbytes)}) is larger than the model it was "
                     f"extracted from ({human_bytes(model)}); a looser policy or --max-rank "
                     "makes it smaller")
    return notes


def _write(ad: LoraAdapter, out: Path, fmt: str, report: ExtractReport, base: str,
           force: bool, inputs: list[Path], options: Options | None) -> None:

    if not ad.modules:
        raise LoraToolError("nothing to extract: no weight differs between the two models "
                            "(or --target/--exclude left none)")
    lost = lossy(ad, fmt)
    if lost:
        fixes = []
        if ad.full or any(m.bias is not None for m in ad.modules.values()):
            fixes.append("--skip-full leaves out what is not a LoRA factor (norms, biases, "
                         "embeddings in full)")
        if fmt == "kohya" and any(m.layout == "embedding" for m in ad.modules.values()):
            fixes.append("without --embed-lora the embeddings are not factorised")
        raise FormatError(f"--format {fmt} cannot hold {'; '.join(lost)}: use --format peft"
                          + "".join(f"; or {f}" for f in fixes))
    write_adapter(ad, out, fmt, base=base, force=force, inputs=inputs,
                  note=report.card_note(), options=options)
