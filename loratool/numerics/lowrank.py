"""Low-rank factors at a rank policy, shared by extract, combine, resize and convert: spectra
(randomized or exact SVD), the rank each policy picks, factors whose error is measured as
stored, and budgets split across modules to minimise the total squared error. The policies
themselves are ``loratool.options.RankPolicy``.

Example: ``factorize(M, RankPolicy.from_options(16, None, None, None), exact=False, seed=0,
store_dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LoraToolError
from ..numerics import ops
from ..options import Fixed, RankPolicy, budget_hints, check_fixed

BUDGET_SPECTRUM = 256  # singular values computed per module for a budget without --max-rank

CONVERGED = 1e-3  # a pass that lowers the error by less than 0.1 % of it ends the iteration


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that depends on the name, not on the order modules are met in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8", "surrogatepass"))) % (2**63)


@dataclass
class Factored:
    """One module factorised: B [m, k], A [k, n] (as stored) and what was measured."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    rel_error: float  # measured ‖M − B@A‖/‖M‖ with the stored factors
    kept_energy: float  # Σ_{i≤k} σ²/‖M‖²
    norm: float  # ‖M‖
    svd: str  # "randomized" or "exact"
    full_rank: int = 0  # min(m, n)
    spectrum: torch.Tensor | None = None  # the leading singular values computed on the way


def spectrum(M: torch.Tensor, want: int, exact: bool, seed: int, power_iters: int = 2,
             total_sq: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """At least ``want`` singular triplets of M (all of them when exact or when ``want`` is
    close to full rank). With ``total_sq`` (‖M‖²) the power iterations stop once the rank-
    ``want`` error has converged to 0.1 % (see ops.randomized_svd)."""

    full = min(M.shape)
    if exact or want * 2 >= full:
        U, S, Vh = ops.exact_svd(M)
        return U, S, Vh, "exact"
    g = torch.Generator(device=M.device).manual_seed(seed)
    U, S, Vh = ops.randomized_svd(M, want, generator=g, power_iters=power_iters,
                                  oversample=max(10, want // 2), tol=CONVERGED,
                                  total_sq=total_sq)
    return U, S, Vh, "randomized"


def _tail_error(S: torch.Tensor, total_sq: float, k: int) -> float:
    """The relative error of the unrounded rank-k truncation: for the exact SVD, and for a
    randomized one (whose U·S·Vh is M projected onto span(U)), ‖M‖² − Σ_{i≤k} S_i² exactly."""
    if not total_sq:
        return 0.0
    kept = float((S[:k].double() ** 2).sum())
    return math.sqrt(max(total_sq - kept, 0.0) / total_sq)


def factorize(M: torch.Tensor, policy: RankPolicy, *, exact: bool, seed: int,
              store_dtype: torch.dtype, rank: int | None = None, name: str = "",
              total_sq: float | None = None) -> Factored:
    """Factorise M by the policy (or at a given ``rank``, for budgets). The subspace grows
    when a policy needs more singular values than were computed; the error is measured on
    the factors rounded to ``store_dtype``."""

    if total_sq is None:  # ‖M‖², when the caller has not measured it already
        total_sq = ops.sum_squares(M)
    norm = math.sqrt(total_sq)
    full = min(M.shape)
    if not total_sq:  # nothing to keep: rank 0, and the module is left out
        empty = torch.zeros(0, device=M.device)
        return Factored(M.new_zeros(M.shape[0], 0).to(store_dtype),
                        M.new_zeros(0, M.shape[1]).to(store_dtype), 0, 0.0, 1.0, 0.0, "none",
                        full, empty.cpu())
    cap = policy.cap(full)
    if rank is not None:
        want = min(rank, cap)
    elif policy.kind == "rank":
        want = min(int(policy.value), cap)
    else:
        want = min(max(32, 2 * (policy.max_rank or 0)), cap)
    # energy and max-error read ranks off the spectrum's tail, which a sketch underestimates
    # most: more power iterations there bring the rank close to the exact SVD's
    iters = 5 if policy.kind in ("energy", "max_error") and rank is None else 2
    # a fixed rank needs the error at that rank converged; energy and max-error the whole
    # spectrum up to it, which every power iteration sharpens
    fixed = rank is not None or policy.kind not in ("energy", "max_error")
    U, S, Vh, how = spectrum(M, want, exact, seed, iters, total_sq if fixed else None)
    if rank is None and policy.kind in ("energy", "max_error"):
        while True:
            k = rank_from_spectrum(policy, S, total_sq)
            if k is not None or how == "exact" or len(S) >= cap:
                break
            U, S, Vh, how = spectrum(M, min(2 * len(S), cap), exact, seed, iters)  # grow
        k = min(k if k is not None else len(S), cap)
    else:
        k = min(want, len(S))

    def build(k: int, dtype: torch.dtype = store_dtype
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
        B, A = ops.split_factors(U, S, Vh, k)
        B, A = B.to(dtype), A.to(dtype)
        res = ops.residual_norm(M, B.to(M.dtype), A.to(M.dtype)) if k else norm
        return B, A, (res / norm if norm else 0.0)

    B, A, err = build(k)
    if rank is None and policy.kind == "max_error" and err > policy.value:
        # a guarantee, measured on the stored factors: rounding can keep the error above E
        # at the spectrum's rank; the smallest rank that meets it
        if len(S) < cap and how != "exact":
            U, S, Vh, how = spectrum(M, cap, exact, seed, iters)
        hi = min(cap, len(S))
        found = smallest_rank_meeting(build, k, hi, policy.value)
        if found is None:
            raise LoraToolError(unreachable_message(
                policy, name, hi, full, build(hi)[2], _tail_error(S, total_sq, hi),
                store_dtype, lambda: build(hi, torch.float32)[2]))
        k, B, A, err = found
    kept = float((S[:k].double() ** 2).sum()) / total_sq if total_sq else 1.0
    return Factored(B, A, k, err, min(kept, 1.0), norm, how, full, S.cpu())


def rank_from_spectrum(policy: RankPolicy, S: torch.Tensor, total_sq: float) -> int | None:
    """The rank ``--energy`` or ``--max-error`` read off a spectrum (for max-error, the rank
    whose unrounded error meets it); None when these singular values do not reach it."""

    frac = policy.value if policy.kind == "energy" else 1.0 - policy.value ** 2
    return ops.rank_for_energy(S, total_sq, frac - 1e-12)


def smallest_rank_meeting(build: Callable[[int], tuple[torch.Tensor, torch.Tensor, float]],
                          lo: int, hi: int, target: float
                          ) -> tuple[int, torch.Tensor, torch.Tensor, float] | None:
    """The smallest rank in (lo, hi] whose stored factors' measured error is ≤ target, by
    bisection (the error falls with the rank); ``build(k)`` → (B, A, error). None when even
    ``hi`` misses: a measured guarantee, one residual per probe rather than per rank."""
    B, A, err = build(hi)
    if err > target:
        return None
    best = (hi, B, A, err)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        Bm, Am, em = build(mid)
        if em <= target:
            hi, best = mid, (mid, Bm, Am, em)
        else:
            lo = mid
    return best


def unreachable_message(policy: RankPolicy, name: str, k: int, full: int, err: float,
                        tail: float, dtype: torch.dtype, fp32_error: Callable[[], float]
                        ) -> str:
    """Why ``--max-error`` cannot be met, with advice that is possible and sufficient."""
    where = f"{name}: " if name else ""
    dt = str(dtype).removeprefix("torch.")
    head = (f"{where}--max-error {policy.value:g} cannot be met: at rank {k} the {dt} factors "
            f"leave an error of {err:.3g}")
    if k < full and tail > policy.value:
        return (f"{head}, and no rounding could do better than {tail:.3g} at that rank; raise "
                f"--max-rank (this matrix has full rank {full})")
    if dt != "float32":
        e32 = fp32_error()
        if e32 <= policy.value:
            return f"{head}, from rounding the factors to {dt}; use --dtype fp32 ({e32:.3g})"
        return (f"{head}; even float32 factors leave {e32:.3g}: ask for --max-error "
                f"{_round_up(e32)} or more")
    if k < full:
        return (f"{head}, from rounding; raise --max-rank (full rank is {full}) or ask for "
                f"--max-error {_round_up(err)} or more")
    return (f"{head} (float32 rounding, at full rank): ask for --max-error {_round_up(err)} "
            "or more")


def _round_up(x: float) -> str:
    """A value a little above ``x`` with two significant digits, for advice."""
    if x <= 0:
        return "0"
    e = math.floor(math.log10(x)) - 1
    return f"{math.ceil(x / 10**e * 1.0001) * 10**e:.2g}"


# --------------------------------------------------------------------------- budgets

@dataclass
class BudgetItem:
    """One module competing for a budget: its leading singular values (descending), what one
    more rank costs (factor entries of both factors, in the budget's unit), its rank cap."""

    name: str
    spectrum: torch.Tensor | None  # None only for a group's placeholder (_grouped)
    per_rank: int
    cap: int
    min_rank: int = 0  # 1 for a module that must keep a rank (its lora bias needs one)
    # the experts of one fused parameter share one rank (PEFT stores r·E): items of a group
    # are allocated together, the k-th rank worth Σₑ σₑₖ² and costing every expert's share
    group: str | None = None


def spectrum_cap(policy: RankPolicy, full: int) -> int:
    """How many singular values a module needs for a budget: up to --max-rank, else 256."""
    return policy.cap(full) if policy.max_rank else min(full, BUDGET_SPECTRUM)


def allocate(policy: RankPolicy, items: list[BudgetItem], fixed: list[Fixed]
             ) -> dict[str, int]:
    """Ranks per module that minimise the total squared error within the budget (after what
    is written whatever the ranks); a clear error, with what would make room, if none fits."""

    budget = policy.budget
    assert budget is not None
    members: dict[str, list[str]] = {}
    items = _grouped(items, members)
    fixed = fixed + [Fixed("the rank a lora bias needs", i.per_rank * i.min_rank, None)
                     for i in items if i.min_rank]
    check_fixed(policy, fixed)
    left = budget.amount - sum(f.cost for f in fixed)
    ranks = ops.allocate_budget([i.spectrum[i.min_rank:] for i in items],
                                [i.per_rank for i in items], left,
                                [i.cap - i.min_rank for i in items])
    ranks = [r + i.min_rank for r, i in zip(ranks, items)]
    if items and not any(ranks):
        cheapest = min(i.per_rank for i in items)
        raise LoraToolError(f"--budget {budget.describe()} leaves {left:,} {budget.unit} for "
                            f"LoRA factors after what is stored in full, less than one rank of "
                            f"the cheapest module needs ({cheapest:,}); raise --budget to at "
                            f"least {budget.amount - left + cheapest:,} {budget.unit}"
                            + budget_hints(fixed))
    return {n: r for i, r in zip(items, ranks) for n in members.get(i.name, [i.name])}


def _grouped(items: list[BudgetItem], members: dict[str, list[str]]) -> list[BudgetItem]:
    """One item per group (its members' spectra combined: the k-th value is
    sqrt(Σ σₖ²), non-increasing as each spectrum is), the others as they are."""

    groups: dict[str, list[BudgetItem]] = {}
    out: list[BudgetItem] = []
    for i in items:
        if i.group is None:
            out.append(i)
        else:
            if i.group not in groups:
                groups[i.group] = []
                out.append(BudgetItem(i.group, None, 0, 0))  # placeholder, keeps the order
            groups[i.group].append(i)
    for k, item in enumerate(out):
        g = groups.get(item.name) if item.spectrum is None else None
        if g is None:
            continue
        n = max(len(i.spectrum) for i in g)
        sq = sum(torch.nn.functional.pad(i.spectrum.double() ** 2, (0, n - len(i.spectrum)))
                 for i in g)
        members[item.name] = [i.name for i in g]
        out[k] = BudgetItem(item.name, sq.sqrt(), sum(i.per_rank for i in g),
                            min(i.cap for i in g), max(i.min_rank for i in g))
    return out
