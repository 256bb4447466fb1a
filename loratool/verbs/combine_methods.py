"""The math of ``combine`` and ``resize``, module by module: ``cat``'s exact stacked sum, the
spectra ``svd`` reads its ranks from, and the elementwise methods' dense deltas (``ties``,
``dare_*``, ``magnitude_prune``) factorised at the rank policy's ranks; and the lora biases,
which add exactly. :class:`CombineJob` holds one run's inputs and what it has made so far.

Example::

    job = CombineJob(adapters, [1.0, 1.0], "svd", RankPolicy.rank(8), 0.5, 0, False,
                     torch.float32)
    job.modules.extend(combine_module(job, key) for key in job.keys)
    choose_svd_ranks(job)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import FormatError, LoraToolError
from ..model import experts
from ..model.adapter import LoraAdapter, LoraModule
from ..numerics import ops
from ..numerics.lowrank import (
    BudgetItem,
    Factored,
    allocate,
    factorize,
    module_seed,
    rank_from_spectrum,
    smallest_rank_meeting,
    spectrum,
    spectrum_cap,
    unreachable_message,
)
from ..options import Fixed, RankPolicy
from ..reports.combine import CombineModule
from .combine_cat import kept_scale

Part = tuple[LoraModule, float]  # a module of one input, and that input's weight


@dataclass
class SvdSums:
    """svd: a module's exact sum as stacked factors (B_sum, A_sum) and its SVD (U, S, Vh),
    kept until the ranks are chosen; ``like`` is the module the result takes its layout of."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    like: LoraModule
    B: torch.Tensor
    A: torch.Tensor


@dataclass
class CombineJob:
    """One combine run: inputs, options, and the modules made so far."""

    adapters: list[LoraAdapter]
    weights: list[float]
    method: str
    policy: RankPolicy
    density: float
    seed: int
    exact: bool
    store: torch.dtype  # dtype of the written factors
    result: LoraAdapter = field(init=False)
    keys: list[str] = field(default_factory=list)
    modules: list[CombineModule] = field(default_factory=list)  # per key, for the report
    spectra: dict[str, SvdSums] = field(default_factory=dict)  # svd: per key
    items: list[BudgetItem] = field(default_factory=list)  # per module (budget)
    pending: list[str] = field(default_factory=list)  # dense modules awaiting their rank
    fixed: list[Fixed] = field(default_factory=list)
    # exploded experts modules: the fused parameter's layout and expert count
    expert_layouts: dict[str, tuple[str, int]] = field(default_factory=dict)

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

    def group(self, key: str) -> str | None:
        """The fused parameter an exploded expert module belongs to (its budget group)."""
        m = experts.EXPERT_KEY.match(key)
        return m.group("name") if m and m.group("name") in self.expert_layouts else None

    def parts(self, key: str) -> list[Part]:
        return [(ad.modules[key], w) for ad, w in zip(self.adapters, self.weights)
                if key in ad.modules]

    def per_rank(self, m: LoraModule) -> int:
        """What one rank of a module shaped like ``m`` costs of the budget."""
        n = m.B.shape[0] + math.prod(m.A.shape[1:])
        return self.policy.budget.cost(n, self.store.itemsize) if self.policy.budget else n

    def entry(self, key: str) -> CombineModule:
        return next(e for e in self.modules if e.name == key)


def _dense(m: LoraModule, w: float) -> torch.Tensor:
    """w·ΔW as the [out, in] matrix that B@A spans (layout-neutral orientation)."""
    B, A = m.factors_2d()
    return (B @ A) * (m.scale * w)


def stacked(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact sum Σ wᵢ sᵢ Bᵢ Aᵢ as stacked factors (B side by side, scaled A's stacked),
    in float64: the wᵢ·sᵢ·Aᵢ products are exact there, so this is the reference every error
    is measured against, and what the written factors are rounded from, once."""

    Bs, As = [], []
    for m, w in parts:
        B, A = m.factors_2d(torch.float64)
        Bs.append(B)
        As.append(A * (m.scale * w))
    return torch.cat(Bs, 1), torch.cat(As, 0)


def dense_method(method: str, parts: list[Part], density: float, seed: int,
                 key: str) -> torch.Tensor:
    """The combined dense delta [out, in] for the elementwise methods."""

    ds = [_dense(m, w) for m, w in parts]  # weights apply to each task vector first
    if method == "magnitude_prune":
        return sum_of([ops.trim(d, density) for d in ds])
    if method == "ties":
        return ops.ties_merge([ops.trim(d, density) for d in ds])
    gens = [torch.Generator().manual_seed(module_seed(seed, f"{i}:{key}"))
            for i in range(len(ds))]
    dropped = [ops.dare(d, density, g) for d, g in zip(ds, gens)]
    if method == "dare_linear":
        return sum_of(dropped)
    return ops.ties_merge(dropped)  # dare_ties


def sum_of(ts: list[torch.Tensor]) -> torch.Tensor:
    """Σ ts exactly as ``sum`` adds them (0 + t₀ + t₁ …: the same bits, −0 included), typed
    as a tensor."""
    out = 0 + ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def _to_module(like: LoraModule, B: torch.Tensor, A: torch.Tensor,
               dtype: torch.dtype, alpha: float | None = None) -> LoraModule:
    """A LoraModule in ``like``'s layout from [out, k] / [k, in] factors, of scale
    ``alpha``/k (default 1)."""

    k = B.shape[1]
    if like.layout == "conv":
        A = A.reshape(k, *like.A.shape[1:])
        B = B.reshape(B.shape[0], k, *[1] * (like.B.dim() - 2))
    return LoraModule(like.name, A.to(dtype).contiguous(), B.to(dtype).contiguous(),
                      float(k) if alpha is None else alpha, False, like.layout, None, None,
                      like.component)


def needs_rank(parts: list[Part]) -> int:
    """A module whose inputs carry lora biases keeps at least rank 1: the bias lives on it."""
    return int(any(m.bias is not None for m, _ in parts))


def combine_module(job: CombineJob, key: str) -> CombineModule:
    """Combine one module: cat and dense results now, svd spectra (and budget spectra) for
    the ranks chosen afterwards."""

    parts = job.parts(key)
    like = parts[0][0]
    entry = CombineModule(key, len(parts), [m.rank for m, _ in parts])
    if job.method == "cat":
        _cat(job, parts, entry)
    elif job.method == "svd":
        B, A = stacked(parts)
        U, S, Vh = ops.factored_svd(B, A)
        job.spectra[key] = SvdSums(U, S, Vh, like, B, A)
        if job.policy.budget is not None:
            job.items.append(BudgetItem(key, S, job.per_rank(like), job.policy.cap(len(S)),
                                        needs_rank(parts), job.group(key)))
        entry.total_norm = float(S.double().pow(2).sum().sqrt())
    else:
        D = dense_method(job.method, parts, job.density, job.seed, key)
        if job.policy.budget is not None:  # spectrum now, factors at the budget's rank
            cap = spectrum_cap(job.policy, min(D.shape))
            _, S, _, _ = spectrum(D, cap, job.exact, module_seed(job.seed, key))
            job.items.append(BudgetItem(key, S[:cap], job.per_rank(like), cap,
                                        needs_rank(parts), job.group(key)))
            job.pending.append(key)
        else:
            _measured(entry, factor_dense(job, key, D))
    return entry


def _cat(job: CombineJob, parts: list[Part], entry: CombineModule) -> None:
    """cat: the exact sum's stacked factors; a sum that is zero (B@A is zero) gets rank 0 and
    is left out. When every part has the same wᵢ·sᵢ (the usual case: one alpha/r, weights 1)
    the factors are written as they are, with that scale: nothing is rounded. Otherwise the
    scaled A's are rounded once, from the exact values, and the module's scale is 1."""
    like = parts[0][0]
    B, A = stacked(parts)
    total = ops.product_norm(B, A)
    if not total and not needs_rank(parts):
        return  # rank 0, error 0
    c = kept_scale([(m.scale, m.rank, w) for m, w in parts])
    if c is not None:  # B and A as stored, the scale on the module
        Bs = torch.cat([m.factors_2d(job.store)[0] for m, _ in parts], 1)
        As = torch.cat([m.factors_2d(job.store)[1] for m, _ in parts], 0)
        job.result.add(_to_module(like, Bs, As, job.store, alpha=c * B.shape[1]))
        applied = As.double() * c  # the A the written module applies, its scale folded in
    else:
        Bs, As = B.to(job.store), A.to(job.store)  # rounded once, from the exact values
        job.result.add(_to_module(like, Bs, As, job.store))
        applied = As.double()
    # the written factors against the exact sum (whose A's are scaled the same way, in
    # float64): 0 when nothing was rounded, else measured
    if not torch.equal(Bs.double(), B):
        err = ops.factored_residual(B, A, Bs, applied)
    else:  # B written as it is: the error is B·(A − Ã), or nothing when Ã = A
        D = A - applied
        err = ops.product_norm(B, D) if D.any() else 0.0
    entry.rank, entry.rel_error = B.shape[1], err / total if total else 0.0


def _measured(entry: CombineModule, f: Factored) -> None:
    entry.rank, entry.rel_error, entry.kept_energy = f.rank, f.rel_error, f.kept_energy


def factor_dense(job: CombineJob, key: str, D: torch.Tensor,
                 rank: int | None = None) -> Factored:
    """A dense result factorised by the policy (or at ``rank``) and added to the result."""
    like = job.parts(key)[0][0]
    f = factorize(D, job.policy, exact=job.exact, seed=module_seed(job.seed, key),
                  store_dtype=job.store, rank=rank, name=key)
    if f.rank:
        job.result.add(_to_module(like, f.B.float(), f.A.float(), job.store))
    return f


def dense_at_budget_ranks(job: CombineJob) -> None:
    """Pass 2 of a budget for ties/dare/magnitude_prune: the same (seeded) dense results,
    factorised at the ranks the budget gives them."""
    chosen = allocate(job.policy, job.items, job.fixed)
    for key in job.pending:
        D = dense_method(job.method, job.parts(key), job.density, job.seed, key)
        _measured(job.entry(key), factor_dense(job, key, D, rank=chosen[key]))


def add_biases(job: CombineJob) -> None:
    """lora biases add exactly: Σ wᵢ·sᵢ·biasᵢ on the module's new scale 1."""
    for key in job.keys:
        bias = [(m.bias, m.scale * w) for m, w in job.parts(key) if m.bias is not None]
        if not bias:
            continue
        if key not in job.result.modules:
            raise FormatError(f"{key}: its lora bias would be lost (the module got rank 0); "
                              "raise the rank or the budget")
        job.result.modules[key].bias = sum_of([b.float() * s for b, s in bias]).to(job.store)


def choose_svd_ranks(job: CombineJob) -> None:
    """Ranks from the exact spectra of the sums (all singular values are known here), the
    factors' error measured against the sum without dense matrices."""

    policy = job.policy
    chosen = allocate(policy, job.items, job.fixed) if policy.budget is not None else {}
    for key, sums in job.spectra.items():
        S = sums.S
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

        def stored(k: int, dtype: torch.dtype = job.store
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
            """Factors as they will be written, and their measured error against the exact
            sum (float64)."""
            B, A = ops.split_factors(sums.U, S.float(), sums.Vh, k)
            B, A = B.to(dtype), A.to(dtype)
            res = ops.factored_residual(sums.B, sums.A, B, A)
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
        entry = job.entry(key)
        entry.rank, entry.rel_error = k, err
        entry.kept_energy = 1 - tail / total if total else 1.0
        if k:
            job.result.add(_to_module(sums.like, B.float(), A.float(), job.store))
