"""``loratool combine`` and ``resize``: adapter arithmetic done right, without dense matrices
where the math allows.

- ``cat``: Σ wᵢ·ΔWᵢ exactly, as one adapter of rank Σ rᵢ: B = [B₁ … Bₙ] side by side and A the
  wᵢ·sᵢ-scaled Aᵢ stacked (scale 1). Summing A's and B's separately, as PEFT's ``linear`` and
  kohya's merge do, adds cross terms Bᵢ·Aⱼ.


- ``svd`` (and ``resize``): that exact sum recompressed to a rank policy without forming it:
  QR of the stacked B's and of the stacked A's, SVD of the small core R_B·R_Aᵀ — the best
  rank-k approximation of the dense sum (Eckart–Young), in O((out + in)·R²).


- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: elementwise by nature, on the
  dense per-module deltas, then factorised with the rank policy (docs/math.md has the
  definitions, and how they differ from PEFT's and mergekit's).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from ..model.adapter import LoraAdapter, LoraModule
from ..numerics import ops
from ..numerics.lowrank import (
    BudgetItem,
    Fixed,
    allocate,
    check_fixed,
    factorize,
    module_seed,
    rank_from_spectrum,
    smallest_rank_meeting,
    spectrum,
    spectrum_cap,
    unreachable_message,
)
from ..options import DTYPES, RankPolicy, check_dtype, check_weights
from ..progress import SILENT, Progress

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _check_compatible(adapters: list[Any], specs: list[str]) -> None:
    """Same base: a module present in several adapters has one base shape and layout."""
    seen: dict[str, tuple[Any, str]] = {}
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


def _dense(m: Any, w: float) -> Any:
    """w·ΔW as the [out, in] matrix that B@A spans (layout-neutral orientation)."""
    B, A = m.factors_2d()
    return (B @ A) * (m.scale * w)


def stacked(parts: list[tuple[Any, float]]) -> tuple[Any, Any]:
    """The exact sum Σ wᵢ sᵢ Bᵢ Aᵢ as stacked factors (B side by side, scaled A's stacked),
    in float64: the wᵢ·sᵢ·Aᵢ products are exact there, so this is the reference every error
    is measured against, and what the written factors are rounded from, once."""

    Bs, As = [], []
    for m, w in parts:
        B, A = m.factors_2d(torch.float64)
        Bs.append(B)
        As.append(A * (m.scale * w))
    return torch.cat(Bs, 1), torch.cat(As, 0)


def dense_method(method: str, parts: list[tuple[Any, float]], density: float,
                 seed: int, key: str) -> Any:
    """The combined dense delta [out, in] for the elementwise methods."""

    ds = [_dense(m, w) for m, w in parts]  # weights apply to each task vector first
    if method == "magnitude_prune":
        return sum(ops.trim(d, density) for d in ds)
    if method == "ties":
        return ops.ties_merge([ops.trim(d, density) for d in ds])
    gens = [torch.Generator().manual_seed(module_seed(seed, f"{i}:{key}"))
            for i in range(len(ds))]
    dropped = [ops.dare(d, density, g) for d, g in zip(ds, gens)]
    if method == "dare_linear":
        return sum(dropped)
    return ops.ties_merge(dropped)  # dare_ties


def _to_module(name: str, like: Any, B: Any, A: Any, dtype: Any, component: Any) -> Any:
    """A LoraModule of scale 1 in ``like``'s layout from [out, k] / [k, in] factors."""

    k = B.shape[1]
    if like.layout == "conv":
        A = A.reshape(k, *like.A.shape[1:])
        B = B.reshape(B.shape[0], k, *[1] * (like.B.dim() - 2))
    return LoraModule(name, A.to(dtype).contiguous(), B.to(dtype).contiguous(), float(k),
                      False, like.layout, None, None, component)


def combine(specs: list[str], out: Path, method: str, *, weights: list[float] | None,
            policy: RankPolicy | None, density: float = 0.5, seed: int = 0,
            fmt: str | None = None, dtype: str = "keep", exact_svd: bool = False,
            base: str | None = None, force: bool = False,
            resize: bool = False, progress: Progress = SILENT) -> dict[str, Any]:
    """Combine adapters (or resize one); writes ``out`` and returns the report.

    read and check everything the headers tell → combine each module (spectra first for a
    budget) → ranks → biases → write → report. ``policy`` None: rank 16 (cat takes none).
    """

    t0 = time.perf_counter()
    _check_options(method, density, policy)
    weights = check_weights(weights, len(specs))
    check_dtype(dtype)
    adapters = _read(specs, base, "resize" if resize else "combine")
    full = _full_tensors(adapters, weights, specs)  # refused before any math, not after it
    adapters, layouts = _explode(adapters)
    first = adapters[0]
    fmt = output_format(out, fmt, first.source_format if first.source_format in FORMATS
                        else "peft", FORMATS)
    inputs = [Path(s) for s in specs if Path(s).exists()]
    check_output(out, inputs, force)
    job = _Combine(adapters, weights, method, policy or RankPolicy("rank", 16.0), density,
                   seed, exact_svd, _store_dtype(first, dtype))
    job.result.full = full
    job.expert_layouts = layouts
    job.fixed = _fixed_costs(job)
    check_fixed(job.policy, job.fixed)
    with progress.bar("resize" if resize else "combine", total=len(job.keys),
                      unit="module") as bar:
        for key in job.keys:
            bar.update(1)
            job.entries.append(_module(job, key))
    if method == "svd":
        _choose_svd_ranks(job)
    elif job.pending:
        _dense_at_budget_ranks(job)
    if job.keys and not job.result.modules:
        if all(e.get("rank") == 0 and not e.get("total_norm", 0.0) and e.get(
                "rel_error", 0.0) == 0.0 for e in job.entries) and method in ("cat", "svd"):
            raise LoraToolError("every module's change is zero (each has a factor of zeros): "
                                "there is nothing to write")
        raise LoraToolError(f"{job.policy.describe()} leaves every module at rank 0; raise "
                            "--budget or --rank")
    _biases(job)
    experts.implode(job.result, layouts)
    path = write_adapter(job.result, out, fmt, base=base, force=force, inputs=inputs,
                         note=f"{'Resized' if resize else 'Combined'} by loratool "
                              f"(method {method}).")
    return _report(job, specs, path, fmt, resize, policy, time.perf_counter() - t0)


@dataclass
class _Combine:
    """One combine run: inputs, options, and the modules made so far."""

    adapters: list[Any]
    weights: list[float]
    method: str
    policy: RankPolicy
    density: float
    seed: int
    exact: bool
    store: Any  # dtype of the written factors
    result: Any = None
    keys: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    spectra: dict[str, Any] = field(default_factory=dict)  # svd: per key U, S, Vh, sums
    items: list[Any] = field(default_factory=list)  # BudgetItem per module (budget)
    pending: list[str] = field(default_factory=list)  # dense modules awaiting their rank
    fixed: list[Fixed] = field(default_factory=list)
    expert_layouts: dict[str, Any] = field(default_factory=dict)  # exploded experts modules

    def group(self, key: str) -> str | None:
        """The fused parameter an exploded expert module belongs to (its budget group)."""
        m = experts.EXPERT_KEY.match(key)
        return m.group("name") if m and m.group("name") in self.expert_layouts else None

    def __post_init__(self) -> None:
        first = self.adapters[0]
        self.result = LoraAdapter(base_model=first.base_model,
                                  base_revision=first.base_revision,
                                  source_format=first.source_format, task_type=first.task_type,
                                  tie_embeddings=any(a.tie_embeddings for a in self.adapters),
                                  naming=first.naming,
                                  metadata={k: v for k, v in first.metadata.items()
                                            if not k.startswith("loratool.")})
        for ad in self.adapters:
            self.keys += [k for k in ad.modules if k not in self.keys]

    def parts(self, key: str) -> list[tuple[Any, float]]:
        return [(ad.modules[key], w) for ad, w in zip(self.adapters, self.weights)
                if key in ad.modules]

    def per_rank(self, m: Any) -> int:
        """What one rank of a module shaped like ``m`` costs of the budget."""
        n = m.B.shape[0] + math.prod(m.A.shape[1:])
        return self.policy.budget.cost(n, self.store.itemsize) if self.policy.budget else n


def _check_options(method: str, density: float, policy: RankPolicy | None) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown --method {method}; choose one of {', '.join(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise UsageError("--density must be in (0, 1]")
    if method == "cat" and policy is not None:
        raise UsageError(f"--method cat writes the exact sum at rank Σ rᵢ and takes no rank "
                         f"policy ({policy.describe()}); use --method svd to recompress it")


def _read(specs: list[str], base: str | None, verb: str) -> list[Any]:
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


def _explode(adapters: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Experts modules as one linear module per expert (``name[e]``), put back together by
    ``experts.implode`` before writing."""
    out, layouts = [], {}
    for ad in adapters:
        x, lay = experts.explode(ad)
        out.append(x)
        layouts.update(lay)
    return out, layouts


def _full_tensors(adapters: list[Any], weights: list[float], specs: list[str]
                  ) -> dict[str, Any]:
    """Full tensors replace, they do not add: each may come from one adapter, unweighted."""
    full: dict[str, Any] = {}
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


def _store_dtype(first: Any, dtype: str) -> Any:
    factors = [m.A.dtype for m in first.modules.values()] or [torch.float32]
    return torch_dtype(DTYPES[dtype]) if DTYPES[dtype] else factors[0]


def _fixed_costs(job: _Combine) -> list[Fixed]:
    """What is written whatever the ranks: full tensors and the modules' lora biases."""
    budget = job.policy.budget
    if budget is None:
        return []
    fixed = [Fixed("full tensors", budget.cost(t.numel(), t.element_size()), None)
             for t in job.result.full.values()]
    for key in job.keys:
        bias = [m for m, _ in job.parts(key) if m.bias is not None]
        if bias:
            fixed.append(Fixed("lora biases", budget.cost(bias[0].bias.numel(),
                                                          job.store.itemsize), None))
    return fixed


def _module(job: _Combine, key: str) -> dict[str, Any]:
    """Combine one module: cat and dense results now, svd spectra (and budget spectra) for
    the ranks chosen afterwards."""

    parts = job.parts(key)
    like = parts[0][0]
    entry: dict[str, Any] = {"name": key, "inputs": len(parts),
                             "input_ranks": [m.rank for m, _ in parts]}
    if job.method == "cat":
        B, A = stacked(parts)
        total = ops.product_norm(B, A)
        if not total and not _needs_rank(parts):  # B@A is zero: rank 0, left out
            entry.update(rank=0, rel_error=0.0)
            return entry
        Bs, As = B.to(job.store), A.to(job.store)  # rounded once, from the exact values
        job.result.add(_to_module(like.name, like, Bs, As, job.store, like.component))
        # the written factors against the exact sum: 0 when rounding changed no value (the
        # usual case: scales and weights of powers of two), else measured
        if not torch.equal(Bs.double(), B):
            err = ops.factored_residual(B, A, Bs, As)
        else:  # B written as it is: the error is B·(A − Ã), or nothing when Ã = A
            D = A - As.double()
            err = ops.product_norm(B, D) if D.any() else 0.0
        entry.update(rank=B.shape[1], rel_error=err / total if total else 0.0)
    elif job.method == "svd":
        B, A = stacked(parts)
        U, S, Vh = ops.factored_svd(B, A)
        job.spectra[key] = (U, S, Vh, like, B, A)
        if job.policy.budget is not None:
            job.items.append(BudgetItem(key, S, job.per_rank(like), job.policy.cap(len(S)),
                                        _needs_rank(parts), job.group(key)))
        entry["total_norm"] = float(S.double().pow(2).sum().sqrt())
    else:
        D = dense_method(job.method, parts, job.density, job.seed, key)
        if job.policy.budget is not None:  # spectrum now, factors at the budget's rank
            cap = spectrum_cap(job.policy, min(D.shape))
            _, S, _, _ = spectrum(D, cap, job.exact, module_seed(job.seed, key))
            job.items.append(BudgetItem(key, S[:cap], job.per_rank(like), cap,
                                        _needs_rank(parts), job.group(key)))
            job.pending.append(key)
        else:
            entry.update(_factor_dense(job, key, D))
    return entry


def _needs_rank(parts: list[tuple[Any, float]]) -> int:
    """A module whose inputs carry lora biases keeps at least rank 1: the bias lives on it."""
    return int(any(m.bias is not None for m, _ in parts))


def _factor_dense(job: _Combine, key: str, D: Any, rank: int | None = None) -> dict[str, Any]:
    like = job.parts(key)[0][0]
    f = factorize(D, job.policy, exact=job.exact, seed=module_seed(job.seed, key),
                  store_dtype=job.store, rank=rank, name=key)
    if f.rank:
        job.result.add(_to_module(like.name, like, f.B.float(), f.A.float(), job.store,
                                  like.component))
    return {"rank": f.rank, "rel_error": f.rel_error, "kept_energy": f.kept_energy}


def _dense_at_budget_ranks(job: _Combine) -> None:
    """Pass 2 of a budget for ties/dare/magnitude_prune: the same (seeded) dense results,
    factorised at the ranks the budget gives them."""
    chosen = allocate(job.policy, job.items, job.fixed)
    for key in job.pending:
        D = dense_method(job.method, job.parts(key), job.density, job.seed, key)
        entry = next(e for e in job.entries if e["name"] == key)
        entry.update(_factor_dense(job, key, D, rank=chosen[key]))


def _biases(job: _Combine) -> None:
    """lora biases add exactly: Σ wᵢ·sᵢ·biasᵢ on the module's new scale 1."""
    for key in job.keys:
        bias = [(m, w) for m, w in job.parts(key) if m.bias is not None]
        if not bias:
            continue
        if key not in job.result.modules:
            raise FormatError(f"{key}: its lora bias would be lost (the module got rank 0); "
                              "raise the rank or the budget")
        job.result.modules[key].bias = sum(m.bias.float() * (m.scale * w)
                                           for m, w in bias).to(job.store)


def _report(job: _Combine, specs: list[str], path: str, fmt: str, resize: bool,
            policy: RankPolicy | None, seconds: float) -> dict[str, Any]:
    errs = [m["rel_error"] for m in job.entries if m.get("rel_error") is not None]
    return {"operation": "resize" if resize else "combine", "inputs": specs,
            "weights": job.weights, "method": job.method, "output": path, "format": fmt,
            "policy": job.policy.describe() if job.method != "cat" else None,
            "density": job.density if job.method in ("ties", "dare_linear", "dare_ties",
                                                     "magnitude_prune") else None,
            "seed": job.seed, "modules": job.entries, "notes": _notes(job),
            "totals": {"lora_modules": len(job.result.modules),
                       "parameters": job.result.num_params(),
                       "bytes": job.result.num_bytes(),
                       "max_rel_error": max(errs, default=0.0),
                       "input_ranks": sorted({r for e in job.entries
                                              for r in e["input_ranks"]}),
                       "ranks": sorted({m.rank for m in job.result.modules.values()})},
            "seconds": seconds}


def _notes(job: _Combine) -> list[str]:
    """Ranks a fixed --rank could not reach: the sum has fewer directions than asked for."""
    p = job.policy
    if p.kind != "rank" or job.method == "cat":
        return []
    short = [e for e in job.entries if e.get("rank", 0) < p.value and (
        p.max_rank is None or e.get("rank", 0) < p.max_rank)]
    if not short:
        return []
    return [f"--rank {int(p.value)} is above what {len(short)} module(s) hold (e.g. "
            f"{short[0]['name']}: rank {short[0].get('rank', 0)}, the rank of the exact "
            "result); they are stored at that rank, exactly"]


def _choose_svd_ranks(job: _Combine) -> None:
    """Ranks from the exact spectra of the sums (all singular values are known here), the
    factors' error measured against the sum without dense matrices."""

    policy = job.policy
    chosen = allocate(policy, job.items, job.fixed) if policy.budget is not None else {}
    for key, (U, S, Vh, like, B_sum, A_sum) in job.spectra.items():
        total = float(S.double().pow(2).sum())
        cap = policy.cap(len(S))
        if not total:  # the sum is zero (a lora_B of zeros): rank 0, left out
            k = 0
        elif policy.kind == "budget":
            k = chosen[key]
        elif policy.kind == "rank":
            k = min(int(policy.value), cap)
        else:
            r = rank_from_spectrum(policy, S, total)
            k = min(r if r is not None else len(S), cap)

        def stored(k: int, dtype: Any = job.store) -> tuple[Any, Any, float]:
            """Factors as they will be written, and their measured error against the exact
            sum (float64)."""
            B, A = ops.split_factors(U, S.float(), Vh, k)
            B, A = B.to(dtype), A.to(dtype)
            res = ops.factored_residual(B_sum, A_sum, B, A)
            return B, A, res / math.sqrt(total) if total else 0.0

        B, A, err = stored(k)
        if policy.kind == "max_error" and err > policy.value:  # a measured guarantee
            found = smallest_rank_meeting(stored, k, cap, policy.value)
            if found is None:
                raise LoraToolError(unreachable_message(
                    policy, key, cap, len(S), stored(cap)[2],
                    float(S[cap:].double().pow(2).sum().sqrt()) / math.sqrt(total),
                    job.store, lambda: stored(cap, torch.float32)[2]))
            k, B, A, err = found
        tail = float(S[k:].double().pow(2).sum())
        entry = next(e for e in job.entries if e["name"] == key)
        entry.update(rank=k, rel_error=err, kept_energy=1 - tail / total if total else 1.0)
        if k:
            job.result.add(_to_module(like.name, like, B.float(), A.float(), job.store,
                                      like.component))
