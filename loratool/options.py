"""Options several commands share, checked without torch: rank policies (``--rank N``,
``--energy F``, ``--max-error E``, ``--budget P``, capped by ``--max-rank N``), output dtypes
and adapter weights.

Example: ``RankPolicy.from_options(rank=None, energy=0.9, max_error=None, budget=None)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LoraToolError, UsageError
from .units import parse_size

DTYPES = {"keep": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    """One finite --weight per adapter, or none (all 1)."""
    weights = list(weights or [])
    if weights and len(weights) != n:
        raise LoraToolError(f"{len(weights)} --weight for {n} adapters; give one per adapter, "
                            "in order, or none")
    if not all(math.isfinite(w) for w in weights):
        raise LoraToolError("--weight must be a finite number")
    return weights or [1.0] * n


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LoraToolError(f"unknown --dtype {dtype}; use keep, fp32, bf16 or fp16")


@dataclass(frozen=True)
class Budget:
    """``--budget``: parameters (``5000000``) or bytes (``50MB``) of what is written."""

    amount: int
    unit: str  # "parameters" or "bytes"
    text: str

    def cost(self, numel: int, itemsize: int) -> int:
        """What ``numel`` values stored at ``itemsize`` bytes each take of the budget."""
        return numel * itemsize if self.unit == "bytes" else numel

    def describe(self) -> str:
        return (f"{self.text} ({self.amount:,} bytes)" if self.unit == "bytes"
                else f"{self.amount:,} parameters")


def parse_budget(text: str) -> Budget:
    """``"1000000"`` → 10⁶ parameters; ``"50MB"`` → 50·10⁶ bytes of the dtype written."""
    t = str(text).strip()
    if t.isdigit() and len(t) <= 30:
        if int(t) <= 0:
            raise UsageError(f"--budget {text} must be positive")
        return Budget(int(t), "parameters", t)
    try:
        return Budget(parse_size(t), "bytes", t)
    except UsageError:
        raise UsageError(f"cannot read --budget {text!r}; give parameters (5000000) or a size "
                         "(50MB)") from None


@dataclass(frozen=True)
class RankPolicy:
    kind: str  # "rank" | "energy" | "max_error" | "budget"
    value: float  # N, F or E (unused for a budget)
    max_rank: int | None = None
    budget: Budget | None = None

    @classmethod
    def from_options(cls, rank: int | None, energy: float | None, max_error: float | None,
                     budget: str | None, max_rank: int | None = None,
                     default_rank: int = 16) -> "RankPolicy":
        """Check the flags (at most one policy, values in range) and build the policy."""
        given = [(k, v) for k, v in (("rank", rank), ("energy", energy),
                                     ("max_error", max_error), ("budget", budget))
                 if v is not None]
        if len(given) > 1:
            raise UsageError("choose one rank policy: --rank, --energy, --max-error or "
                             "--budget")
        if max_rank is not None and max_rank < 1:
            raise UsageError("--max-rank must be at least 1")
        kind, value = given[0] if given else ("rank", default_rank)
        if kind == "rank" and (isinstance(value, bool) or not isinstance(value, int)
                               or value < 1):
            raise UsageError("--rank must be a positive integer")
        if kind == "energy" and not 0.0 < float(value) <= 1.0:
            raise UsageError("--energy must be a fraction in (0, 1], e.g. 0.9")
        if kind == "max_error" and not 0.0 <= float(value) < 1.0:
            raise UsageError("--max-error must be in [0, 1), e.g. 0.05 for 5 %")
        if kind == "budget":
            return cls("budget", 0.0, max_rank, parse_budget(str(value)))
        return cls(kind, float(value), max_rank)

    def describe(self) -> str:
        """``rank 16``, ``energy 0.9``, ``max-error 0.05``, ``budget 50MB (…)``, with a cap."""
        text = {"rank": lambda: f"rank {int(self.value)}",
                "energy": lambda: f"energy {self.value:g}",
                "max_error": lambda: f"max-error {self.value:g}",
                "budget": lambda: f"budget {self.budget.describe()}"}[self.kind]()  # type: ignore
        return text + (f", max-rank {self.max_rank}" if self.max_rank else "")

    def cap(self, full: int) -> int:
        return min(full, self.max_rank or full)
