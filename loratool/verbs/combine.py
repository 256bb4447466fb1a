"""``loratool combine`` and ``resize``: adapter arithmetic done right, without dense matrices
where the math allows (the per-module math is in ``combine_methods``).

- ``cat``: Σ wᵢ·ΔWᵢ exactly, as one adapter of rank Σ rᵢ: B = [B₁ … Bₙ] side by side and the
  Aᵢ stacked, as they are with the one scale wᵢ·sᵢ they share (PEFT folders: copied byte for
  byte by ``combine_cat``, without torch), else scaled by wᵢ·sᵢ (scale 1). Summing A's and B's
  separately, as PEFT's ``linear`` and kohya's merge do, adds cross terms Bᵢ·Aⱼ.
- ``svd`` (and ``resize``): that exact sum recompressed to a rank policy without forming it:
  QR of the stacked B's and of the stacked A's, SVD of the small core R_B·R_Aᵀ — the best
  rank-k approximation of the dense sum (Eckart–Young), in O((out + in)·R²).
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: elementwise by nature, on the
  dense per-module deltas, then factorised with the rank policy (docs/math.md has the
  definitions, and how they differ from PEFT's and mergekit's).

Example::

    import loratool
    report = loratool.combine(["style/", "task/"], "both/", "cat", weights=[0.7, 1.0])
    small = loratool.resize("both/", "both-r8/", policy=RankPolicy.rank(8))
    print(small.render())
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..errors import FormatError, LoraToolError, UsageError
from ..formats import (
    FORMATS,
    output_format,
    read_any,
    require_lora,
    require_resolved,
    write_adapter,
)
from ..io.staging import check_output
from ..io.tensors import torch_dtype
from ..model import experts
from ..model.adapter import LoraAdapter
from ..options import DTYPES, Fixed, Options, RankPolicy, check_dtype, check_fixed, check_weights
from ..progress import SILENT, Progress
from ..reports.combine import CombineReport, CombineTotals
from .combine_cat import cat_bytes
from .combine_methods import (
    CombineJob,
    add_biases,
    choose_svd_ranks,
    combine_module,
    dense_at_budget_ranks,
)

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PathLike = str | os.PathLike[str]


def combine(adapters: list[PathLike], out: PathLike, method: str, *,
            weights: list[float] | None = None, policy: RankPolicy | None = None,
            density: float = 0.5, seed: int = 0, fmt: str | None = None, dtype: str = "keep",
            exact_svd: bool = False, base: str | None = None, force: bool = False,
            options: Options | None = None, progress: Progress = SILENT) -> CombineReport:
    """Combine ``adapters`` (paths or Hub ids, any format, the same base) with ``method`` (one
    of :data:`METHODS`) and write the result to ``out``.

    ``weights``: one per adapter (default 1). ``policy``: the ranks of the result (default
    rank 16; ``cat`` takes none: it writes the exact sum at rank Σ rᵢ). ``density``: the
    fraction ties, dare_* and magnitude_prune keep; ``seed``: DARE's drops. ``fmt``: the
    output format (default the first adapter's); ``dtype``: keep, fp32, bf16 or fp16.
    Raises :class:`loratool.LoraToolError` (nothing is written) on bad input.

    Example::

        r = loratool.combine(["style/", "task/"], "both/", "svd", weights=[0.7, 1.0],
                             policy=RankPolicy.rank(16))
        r.totals.ranks, r.totals.max_rel_error
    """
    return _run(adapters, out, method, weights, policy, density, seed, fmt, dtype, exact_svd,
                base, force, False, options, progress)


def _run(adapters: list[PathLike], out: PathLike, method: str, weights: list[float] | None,
         policy: RankPolicy | None, density: float, seed: int, fmt: str | None, dtype: str,
         exact_svd: bool, base: str | None, force: bool, resize: bool,
         options: Options | None, progress: Progress) -> CombineReport:
    """combine, and resize (``resize``: one adapter, method svd, named so in the report)."""
    t0 = time.perf_counter()
    specs, out = [os.fspath(a) for a in adapters], Path(out)
    _check_options(method, density, policy)
    weights = check_weights(weights, len(specs))
    check_dtype(dtype)
    if method == "cat" and not resize:  # concatenation, where it is only that: the bytes
        done = cat_bytes(specs, out, weights, fmt=fmt, dtype=dtype, base=base, seed=seed,
                         force=force, options=options, progress=progress)
        if done is not None:
            return done
    read = _read(specs, base, "resize" if resize else "combine")
    full = _full_tensors(read, weights, specs)  # refused before any math, not after it
    read, layouts = _explode(read)
    first = read[0]
    fmt = output_format(out, fmt, first.source_format if first.source_format in FORMATS
                        else "peft", FORMATS)
    inputs = [Path(s) for s in specs if Path(s).exists()]
    check_output(out, inputs, force)
    job = CombineJob(read, weights, method, policy or RankPolicy.rank(16), density,
                     seed, exact_svd, _store_dtype(first, dtype))
    job.result.full = full
    job.expert_layouts = layouts
    job.fixed = _fixed_costs(job)
    check_fixed(job.policy, job.fixed)
    with progress.bar("resize" if resize else "combine", total=len(job.keys),
                      unit="module") as bar:
        for key in job.keys:
            bar.update(1)
            job.modules.append(combine_module(job, key))
    if method == "svd":
        choose_svd_ranks(job)
    elif job.pending:
        dense_at_budget_ranks(job)
    _check_written(job)
    add_biases(job)
    experts.implode(job.result, layouts)
    path = write_adapter(job.result, out, fmt, base=base, force=force, inputs=inputs,
                         note=f"{'Resized' if resize else 'Combined'} by loratool "
                              f"(method {method}).", options=options)
    return _report(job, specs, path, fmt, resize, time.perf_counter() - t0)


def resize(adapter: PathLike, out: PathLike, *, policy: RankPolicy | None = None,
           fmt: str | None = None, dtype: str = "keep", base: str | None = None,
           force: bool = False, options: Options | None = None,
           progress: Progress = SILENT) -> CombineReport:
    """Reduce ``adapter``'s ranks optimally: per module the truncated SVD of B@A, computed from
    the factors, at the ranks ``policy`` gives (default rank 16); writes ``out`` and reports
    the rank and the measured error of each module.

    Example::

        r = loratool.resize("adapter-r64/", "adapter-r16/", policy=RankPolicy.rank(16))
        r.totals.input_ranks, r.totals.ranks, r.totals.max_rel_error
    """
    return _run([adapter], out, "svd", None, policy, 0.5, 0, fmt, dtype, False, base, force,
                True, options, progress)


def _check_options(method: str, density: float, policy: RankPolicy | None) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown --method {method}; choose one of {', '.join(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise UsageError("--density must be in (0, 1]")
    if method == "cat" and policy is not None:
        raise UsageError(f"--method cat writes the exact sum at rank Σ rᵢ and takes no rank "
                         f"policy ({policy.describe()}); use --method svd to recompress it")


def _check_compatible(adapters: list[LoraAdapter], specs: list[str]) -> None:
    """Same base: a module present in several adapters has one base shape and layout."""
    seen: dict[str, tuple[tuple[tuple[int, ...], str], str]] = {}
    for ad, spec in zip(adapters, specs):
        for key, m in ad.modules.items():
            if m.magnitude is not None:
                raise FormatError(f"{spec}: {key} is DoRA: a DoRA magnitude does not add, so "
                                  "DoRA adapters cannot be combined (merge it alone instead)")
            prev = seen.get(key)
            if prev is None:
                seen[key] = ((m.base_shape, m.layout), spec)
            elif prev[0] != (m.base_shape, m.layout):
                raise FormatError(f"{spec} and {prev[1]} are for different bases: {key} is "
                                  f"{list(m.base_shape)} ({m.layout}) in one and "
                                  f"{list(prev[0][0])} ({prev[0][1]}) in the other")


def _read(specs: list[str], base: str | None, verb: str) -> list[LoraAdapter]:
    adapters = [read_any(s, base) for s in specs]
    for ad, spec in zip(adapters, specs):
        require_lora(ad, spec, f"{verb} works on LoRA factors")  # before names: no --base
        require_resolved(ad, spec)
    if len({ad.naming for ad in adapters}) > 1:
        raise FormatError("some adapters have llama.cpp's tensor names and others the "
                          "transformers module names: pass --base with the transformers model "
                          "to name them alike")
    _check_compatible(adapters, specs)
    return adapters


def _explode(adapters: list[LoraAdapter]
             ) -> tuple[list[LoraAdapter], dict[str, tuple[str, int]]]:
    """Experts modules as one linear module per expert (``name[e]``), put back together by
    ``experts.implode`` before writing."""
    out, layouts = [], {}
    for ad in adapters:
        x, lay = experts.explode(ad)
        out.append(x)
        layouts.update(lay)
    return out, layouts


def _full_tensors(adapters: list[LoraAdapter], weights: list[float], specs: list[str]
                  ) -> dict[str, torch.Tensor]:
    """Full tensors replace, they do not add: each may come from one adapter, unweighted."""
    full: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for ad, w, spec in zip(adapters, weights, specs):
        for name, t in ad.full.items():
            if name in full:
                raise FormatError(f"{spec} and {owner[name]} both replace {name} in full "
                                  "(modules_to_save); full tensors replace, they do not add: "
                                  "combine one of them without it (convert "
                                  "--drop-unsupported to kohya and back drops full tensors)")
            if w != 1.0:
                raise FormatError(f"{spec}: a full tensor ({name}) cannot be weighted; give "
                                  "this adapter --weight 1")
            full[name], owner[name] = t, spec
    return full


def _store_dtype(first: LoraAdapter, dtype: str) -> torch.dtype:
    factors = [m.A.dtype for m in first.modules.values()] or [torch.float32]
    return torch_dtype(DTYPES[dtype]) if DTYPES[dtype] else factors[0]


def _fixed_costs(job: CombineJob) -> list[Fixed]:
    """What is written whatever the ranks: full tensors and the modules' lora biases."""
    budget = job.policy.budget
    if budget is None:
        return []
    fixed = [Fixed("full tensors", budget.cost(t.numel(), t.element_size()), None)
             for t in job.result.full.values()]
    for key in job.keys:
        bias = [m.bias for m, _ in job.parts(key) if m.bias is not None]
        if bias:
            fixed.append(Fixed("lora biases", budget.cost(bias[0].numel(),
                                                          job.store.itemsize), None))
    return fixed


def _check_written(job: CombineJob) -> None:
    """Refuse a result with no module left: all zero, or a policy that leaves rank 0."""
    if not job.keys or job.result.modules:
        return
    if all(e.rank == 0 and not e.total_norm and e.rel_error == 0.0
           for e in job.modules) and job.method in ("cat", "svd"):
        raise LoraToolError("every module's change is zero (each has a factor of zeros): "
                            "there is nothing to write")
    raise LoraToolError(f"{job.policy.describe()} leaves every module at rank 0; raise "
                        "--budget or --rank")


def _report(job: CombineJob, specs: list[str], path: str, fmt: str, resize: bool,
            seconds: float) -> CombineReport:
    totals = CombineTotals(
        lora_modules=len(job.result.modules), parameters=job.result.num_params(),
        bytes=job.result.num_bytes(),
        max_rel_error=max((e.rel_error for e in job.modules), default=0.0),
        input_ranks=sorted({r for e in job.modules for r in e.input_ranks}),
        ranks=sorted({m.rank for m in job.result.modules.values()}))
    return CombineReport(
        operation="resize" if resize else "combine", inputs=specs, weights=job.weights,
        method=job.method, output=path, format=fmt,
        policy=job.policy.describe() if job.method != "cat" else None,
        density=job.density if job.method in ("ties", "dare_linear", "dare_ties",
                                              "magnitude_prune") else None,
        seed=job.seed, modules=job.modules, notes=_notes(job), totals=totals,
        seconds=seconds)


def _notes(job: CombineJob) -> list[str]:
    """Ranks a fixed --rank could not reach: the sum has fewer directions than asked for."""
    p = job.policy
    if p.kind != "rank" or job.method == "cat":
        return []
    short = [e for e in job.modules if e.rank < p.value and (
        p.max_rank is None or e.rank < p.max_rank)]
    if not short:
        return []
    return [f"--rank {int(p.value)} is above what {len(short)} module(s) hold (e.g. "
            f"{short[0].name}: rank {short[0].rank}, the rank of the exact "
            "result); they are stored at that rank, exactly"]
