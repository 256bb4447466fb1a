"""Rank policies, shared by extract, combine and resize.

``--rank N`` (fixed), ``--energy F`` (keep a fraction F of Σσ²), ``--max-error E`` (relative
Frobenius error ≤ E per module, measured on the factors as stored), ``--budget P`` (a total
parameter count or size, split across modules to minimise the total squared error), and
``--max-rank N`` capping any of them.

Example: ``RankPolicy.from_options(rank=None, energy=0.9, max_error=None, budget=None)``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

from .errors import LoraToolError


@dataclass(frozen=True)
class RankPolicy:
    kind: str  # "rank" | "energy" | "max_error" | "budget"
    value: float  # N, F, E, or the budget in parameters
    max_rank: int | None = None
    budget_text: str | None = None

    @classmethod
    def from_options(cls, rank: int | None, energy: float | None, max_error: float | None,
                     budget: str | None, max_rank: int | None = None,
                     bytes_per_param: int = 2, default_rank: int = 16) -> "RankPolicy":
        """Check the flags (at most one policy) and build the policy."""
        given = [(k, v) for k, v in (("rank", rank), ("energy", energy),
                                     ("max_error", max_error), ("budget", budget))
                 if v is not None]
        if len(given) > 1:
            raise LoraToolError("choose one rank policy: --rank, --energy, --max-error or "
                                "--budget")
        if max_rank is not None and max_rank < 1:
            raise LoraToolError("--max-rank must be at least 1")
        kind, value = given[0] if given else ("rank", default_rank)
        if kind == "rank" and (not isinstance(value, int) or value < 1):
            raise LoraToolError("--rank must be a positive integer")
        if kind == "energy" and not 0.0 < float(value) <= 1.0:
            raise LoraToolError("--energy must be a fraction in (0, 1], e.g. 0.9")
        if kind == "max_error" and not 0.0 <= float(value) < 1.0:
            raise LoraToolError("--max-error must be in [0, 1), e.g. 0.05 for 5 %")
        if kind == "budget":
            return cls("budget", float(parse_budget(str(value), bytes_per_param)), max_rank,
                       str(value))
        return cls(kind, float(value), max_rank)

    def describe(self) -> str:
        """``rank 16``, ``energy 0.9``, ``max-error 0.05``, ``budget 50MB``, with a cap."""
        text = {"rank": f"rank {int(self.value)}", "energy": f"energy {self.value:g}",
                "max_error": f"max-error {self.value:g}",
                "budget": f"budget {self.budget_text} ({int(self.value):,} parameters)"
                }[self.kind]
        return text + (f", max-rank {self.max_rank}" if self.max_rank else "")

    def cap(self, full: int) -> int:
        return min(full, self.max_rank or full)


def parse_budget(text: str, bytes_per_param: int) -> int:
    """``"1000000"`` → parameters; ``"50MB"`` → 50·10⁶ / bytes per parameter."""
    from .writer import parse_size

    t = text.strip().upper()
    if t.isdigit():
        return int(t)
    try:
        return parse_size(t) // bytes_per_param
    except LoraToolError:
        raise LoraToolError(f"cannot read budget {text!r}; give parameters (5000000) or a "
                            "size (50MB)") from None


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that depends on the name, not on the order modules are met in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@dataclass
class Factored:
    """One module factorised: B [m, k], A [k, n] (as stored) and what was measured."""

    B: Any
    A: Any
    rank: int
    rel_error: float  # measured ‖M − B@A‖/‖M‖ with the stored factors
    kept_energy: float  # Σ_{i≤k} σ²/‖M‖²
    norm: float  # ‖M‖
    svd: str  # "randomized" or "exact"


def spectrum(M: Any, want: int, exact: bool, seed: int, power_iters: int = 2
             ) -> tuple[Any, Any, Any, str]:
    """At least ``want`` singular triplets of M (all of them when exact or when ``want`` is
    close to full rank)."""
    import torch

    from . import ops

    full = min(M.shape)
    if exact or want * 2 >= full:
        U, S, Vh = ops.exact_svd(M)
        return U, S, Vh, "exact"
    g = torch.Generator(device=M.device).manual_seed(seed)
    U, S, Vh = ops.randomized_svd(M, want, generator=g, power_iters=power_iters,
                                  oversample=max(10, want // 2))
    return U, S, Vh, "randomized"


def factorize(M: Any, policy: RankPolicy, *, exact: bool, seed: int, store_dtype: Any,
              rank: int | None = None) -> Factored:
    """Factorise M by the policy (or at a given ``rank``, for budgets). The subspace grows
    when a policy needs more singular values than were computed; the error is measured on
    the factors rounded to ``store_dtype``."""
    import torch

    from . import ops

    total_sq = float(torch.linalg.vector_norm(M, dtype=torch.float64) ** 2)
    norm = math.sqrt(total_sq)
    full = min(M.shape)
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
    U, S, Vh, how = spectrum(M, want, exact, seed, iters)
    if rank is None and policy.kind in ("energy", "max_error"):
        frac = policy.value if policy.kind == "energy" else 1.0 - policy.value ** 2
        while True:
            k = ops.rank_for_energy(S, total_sq, frac)
            if k is not None or how == "exact" or len(S) >= cap:
                break
            U, S, Vh, how = spectrum(M, min(2 * len(S), cap), exact, seed, iters)  # grow
        k = min(k if k is not None else len(S), cap)
    else:
        k = min(want, len(S))

    def build(k: int) -> tuple[Any, Any, float]:
        B, A = ops.split_factors(U, S, Vh, k)
        B, A = B.to(store_dtype), A.to(store_dtype)
        res = ops.residual_norm(M, B.to(M.dtype), A.to(M.dtype)) if k else norm
        return B, A, (res / norm if norm else 0.0)

    B, A, err = build(k)
    if rank is None and policy.kind == "max_error":
        # a guarantee: measured on the stored factors; add components until it holds
        while err > policy.value and k < cap:
            k += 1
            if k > len(S):
                U, S, Vh, how = spectrum(M, min(2 * k, cap), exact, seed, iters)
            B, A, err = build(k)
        if err > policy.value:
            raise LoraToolError(
                f"--max-error {policy.value:g} cannot be met even at rank {k} (error "
                f"{err:.3g}); the rounding of {str(store_dtype).removeprefix('torch.')} factors "
                "is larger: use --dtype fp32, or raise --max-rank")
    kept = float((S[:k].double() ** 2).sum()) / total_sq if total_sq else 1.0
    return Factored(B, A, k, err, min(kept, 1.0), norm, how)
