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
from pathlib import Path
from typing import Any

from .errors import FormatError, LoraToolError
from .policy import RankPolicy, factorize, module_seed
from .progress import SILENT, Progress

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


def _oriented(m: Any) -> tuple[Any, Any]:
    """(B [out, r], A [r, in]) in float32 as 2-D matrices, whatever the layout."""
    import torch

    B = m.B.to(torch.float32).reshape(m.B.shape[0], m.B.shape[1])
    A = m.A.to(torch.float32).reshape(m.A.shape[0], -1)
    return B, A


def _dense(m: Any, w: float) -> Any:
    """w·ΔW as the [out, in] matrix that B@A spans (layout-neutral orientation)."""
    B, A = _oriented(m)
    return (B @ A) * (m.scale * w)


def stacked(parts: list[tuple[Any, float]]) -> tuple[Any, Any]:
    """The exact sum Σ wᵢ sᵢ Bᵢ Aᵢ as stacked factors (B side by side, scaled A's stacked)."""
    import torch

    Bs, As = [], []
    for m, w in parts:
        B, A = _oriented(m)
        Bs.append(B)
        As.append(A * (m.scale * w))
    return torch.cat(Bs, 1), torch.cat(As, 0)


def factored_svd(B: Any, A: Any) -> tuple[Any, Any, Any]:
    """SVD of B@A without forming it: B = Q_B R_B, Aᵀ = Q_A R_A, R_B R_Aᵀ = U' S V'ᵀ, so
    B@A = (Q_B U') S (Q_A V')ᵀ. Float64 for the small core keeps the spectrum exact enough to
    read errors from it."""
    import torch

    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.T.double())
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return (qb @ u).float(), s, (vh @ qa.T).float()


def _trim(d: Any, density: float) -> Any:
    """Keep the top ``density`` fraction of entries by magnitude (TIES 'trim')."""
    import torch

    k = int(math.ceil(density * d.numel()))
    if k >= d.numel():
        return d
    if k == 0:
        return torch.zeros_like(d)
    thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values
    return torch.where(d.abs() >= thresh, d, torch.zeros_like(d))


def _dare(d: Any, density: float, gen: Any) -> Any:
    """DARE: drop each entry with probability 1 − density, rescale the rest by 1/density."""
    import torch

    keep = torch.rand(d.shape, generator=gen, dtype=torch.float32) < density
    return torch.where(keep, d / density, torch.zeros_like(d))


def _ties_merge(ds: list[Any]) -> Any:
    """TIES elect + disjoint merge: the sign of Σ τ̂ᵢ per entry, then the mean of the entries
    that agree with it (zeros do not vote and are not averaged)."""
    import torch

    stack = torch.stack(ds)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (stack * agree).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def dense_method(method: str, parts: list[tuple[Any, float]], density: float,
                 seed: int, key: str) -> Any:
    """The combined dense delta [out, in] for the elementwise methods."""
    import torch

    ds = [_dense(m, w) for m, w in parts]  # weights apply to each task vector first
    if method == "magnitude_prune":
        return sum(_trim(d, density) for d in ds)
    if method == "ties":
        return _ties_merge([_trim(d, density) for d in ds])
    gens = [torch.Generator().manual_seed(module_seed(seed, f"{i}:{key}"))
            for i in range(len(ds))]
    dropped = [_dare(d, density, g) for d, g in zip(ds, gens)]
    if method == "dare_linear":
        return sum(dropped)
    return _ties_merge(dropped)  # dare_ties


def _to_module(name: str, like: Any, B: Any, A: Any, dtype: Any, component: Any) -> Any:
    """A LoraModule of scale 1 in ``like``'s layout from [out, k] / [k, in] factors."""
    from .adapter import LoraModule

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
    """Combine adapters (or resize one); writes ``out`` and returns the report."""
    import torch

    from .adapter import LoraAdapter
    from .checkpoint import torch_dtype
    from .formats import read_any, require_resolved
    from .options import DTYPES, check_dtype, check_weights

    t0 = time.perf_counter()
    if method not in METHODS:
        raise LoraToolError(f"unknown --method {method}; choose one of {', '.join(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise LoraToolError("--density must be in (0, 1]")
    weights = check_weights(weights, len(specs))
    check_dtype(dtype)
    adapters = [read_any(s, base) for s in specs]
    for ad, spec in zip(adapters, specs):
        require_resolved(ad, spec)
    _check_compatible(adapters, specs)
    from .writer import check_output

    inputs = [Path(s) for s in specs if Path(s).exists()]
    check_output(out, inputs, force)
    first = adapters[0]
    keys: list[str] = []
    for ad in adapters:
        keys += [k for k in ad.modules if k not in keys]
    factors = [m.A.dtype for m in first.modules.values()] or [torch.float32]
    store = torch_dtype(DTYPES[dtype]) if DTYPES[dtype] else factors[0]
    result = LoraAdapter(base_model=first.base_model, base_revision=first.base_revision,
                         source_format=first.source_format, task_type=first.task_type,
                         tie_embeddings=any(a.tie_embeddings for a in adapters),
                         metadata={k: v for k, v in first.metadata.items()
                                   if not k.startswith("loratool.")})
    report_modules = []
    spectra: dict[str, Any] = {}
    bar = progress.bar("resize" if resize else "combine", total=len(keys), unit="module")
    for key in keys:
        bar.update(1)
        parts = [(ad.modules[key], w) for ad, w in zip(adapters, weights) if key in ad.modules]
        like = parts[0][0]
        entry: dict[str, Any] = {"name": key, "inputs": len(parts),
                                 "input_ranks": [m.rank for m, _ in parts]}
        if method == "cat":
            B, A = stacked(parts)
            result.add(_to_module(like.name, like, B, A, store, like.component))
            total = factored_residual(B, A, torch.zeros(B.shape[0], 0),
                                      torch.zeros(0, A.shape[1]))
            err = factored_residual(B, A, B.to(store).float(), A.to(store).float())
            entry.update(rank=B.shape[1], rel_error=err / total if total else 0.0)
        elif method == "svd":
            B, A = stacked(parts)
            U, S, Vh = factored_svd(B, A)
            spectra[key] = (U, S, Vh, like, B.shape[0] + A.shape[1], B, A)
            entry["total_norm"] = float(S.double().pow(2).sum().sqrt())
        else:
            D = dense_method(method, parts, density, seed, key)
            f = factorize(D, policy or RankPolicy("rank", 16.0), exact=exact_svd,
                          seed=module_seed(seed, key), store_dtype=store)
            result.add(_to_module(like.name, like, f.B.float(), f.A.float(), store,
                                  like.component))
            entry.update(rank=f.rank, rel_error=f.rel_error, kept_energy=f.kept_energy)
        report_modules.append(entry)
    bar.close()
    if method == "svd":
        _choose_svd_ranks(spectra, policy or RankPolicy("rank", 16.0), result, report_modules,
                          store)
        if spectra and not result.modules:
            raise LoraToolError(f"{(policy or RankPolicy('rank', 16.0)).describe()} leaves every "
                                "module at rank 0; raise --budget or --rank")
    for key in keys:  # lora biases add exactly: Σ wᵢ·sᵢ·biasᵢ on the module's new scale 1
        bias = [(ad.modules[key], w) for ad, w in zip(adapters, weights)
                if key in ad.modules and ad.modules[key].bias is not None]
        if not bias:
            continue
        if key not in result.modules:
            raise FormatError(f"{key}: its lora bias would be lost (the module got rank 0); "
                              "raise the rank or the budget")
        result.modules[key].bias = sum(m.bias.float() * (m.scale * w) for m, w in bias).to(store)
    for ad, w, spec in zip(adapters, weights, specs):
        for name, t in ad.full.items():
            if name in result.full:
                raise FormatError(f"{spec}: full tensor {name} (modules_to_save) is in several "
                                  "adapters; full tensors replace, they do not add")
            if w != 1.0:
                raise FormatError(f"{spec}: a full tensor ({name}) cannot be weighted")
            result.full[name] = t
    fmt = fmt or (first.source_format if first.source_format in ("peft", "kohya", "diffusers")
                  else "peft")
    from .formats import write_adapter

    path = write_adapter(result, out, fmt, base=base, force=force, inputs=inputs,
                         note=f"{'Resized' if resize else 'Combined'} by loratool "
                              f"(method {method}).")
    errs = [m["rel_error"] for m in report_modules if m.get("rel_error") is not None]
    return {"inputs": specs, "weights": weights, "method": method, "output": path,
            "format": fmt, "policy": policy.describe() if policy and method != "cat" else None,
            "density": density if method in ("ties", "dare_linear", "dare_ties",
                                              "magnitude_prune") else None,
            "seed": seed, "modules": report_modules,
            "totals": {"lora_modules": len(result.modules), "parameters": result.num_params(),
                       "max_rel_error": max(errs, default=0.0),
                       "ranks": sorted({m.rank for m in result.modules.values()})},
            "seconds": time.perf_counter() - t0}


def _choose_svd_ranks(spectra: dict[str, Any], policy: RankPolicy, result: Any,
                      report_modules: list[dict[str, Any]], store: Any) -> None:
    """Ranks from the exact spectra of the sums (all singular values are known here)."""
    from . import ops

    chosen: dict[str, int] = {}
    keys = list(spectra)
    if policy.kind == "budget":
        ranks = ops.allocate_budget([spectra[k][1] for k in keys],
                                    [spectra[k][4] for k in keys], int(policy.value),
                                    [policy.cap(len(spectra[k][1])) for k in keys])
        chosen = dict(zip(keys, ranks))
    for key in keys:
        U, S, Vh, like, _, B_sum, A_sum = spectra[key]
        total = float(S.double().pow(2).sum())
        cap = policy.cap(len(S))
        if policy.kind == "budget":
            k = chosen[key]
        elif policy.kind == "rank":
            k = min(int(policy.value), cap)
        else:
            frac = policy.value if policy.kind == "energy" else 1.0 - policy.value ** 2
            k = min(ops.rank_for_energy(S, total, frac - 1e-12) or len(S), cap)
        entry = next(e for e in report_modules if e["name"] == key)

        def stored(k: int) -> tuple[Any, Any, float]:
            """Factors as they will be written, and their measured error against the sum."""
            B, A = ops.split_factors(U, S.float(), Vh, k)
            B, A = B.to(store), A.to(store)
            res = factored_residual(B_sum, A_sum, B.float(), A.float())
            return B, A, res / math.sqrt(total) if total else 0.0

        B, A, err = stored(k)
        if policy.kind == "max_error":  # a guarantee, measured on the stored factors
            while err > policy.value and k < cap:
                k += 1
                B, A, err = stored(k)
            if err > policy.value:
                raise LoraToolError(f"{key}: --max-error {policy.value:g} cannot be met with "
                                    f"{str(store).removeprefix('torch.')} factors (error "
                                    f"{err:.3g} at rank {k}); use --dtype fp32")
        tail = float(S[k:].double().pow(2).sum())
        entry.update(rank=k, rel_error=err, kept_energy=1 - tail / total if total else 1.0)
        if k == 0:
            continue
        result.add(_to_module(like.name, like, B.float(), A.float(), store, like.component))


def factored_residual(B1: Any, A1: Any, B2: Any, A2: Any) -> float:
    """‖B1·A1 − B2·A2‖_F without forming either product: with [B1, −B2] = Q_L·R_L and
    [A1; A2]ᵀ = Q_R·R_R, the difference is Q_L·(R_L·R_Rᵀ)·Q_Rᵀ and has the core's norm."""
    import torch

    left = torch.cat([B1.double(), -B2.double()], 1)
    right = torch.cat([A1.double(), A2.double()], 0)
    rl = torch.linalg.qr(left).R
    rr = torch.linalg.qr(right.T).R
    return float(torch.linalg.matrix_norm(rl @ rr.T))
