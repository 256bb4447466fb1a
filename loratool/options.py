"""Options the verbs share, checked without torch: how outputs are written and math runs
(:class:`Options`, passed down explicitly: the same from the command line, the demo or
Python), rank policies (``--rank N``, ``--energy F``, ``--max-error E``, ``--budget P``,
capped by ``--max-rank N``), output dtypes and adapter weights.

Example::

    options = Options(fsync=False)              # scratch work: no flush before publishing
    RankPolicy.from_options(rank=None, energy=0.9, max_error=None, budget=None)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoraToolError, UsageError
from .units import parse_size

DTYPES = {"keep": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


@dataclass
class OutputRecord:
    """An output a command began writing: where, whether one was there, whether it is now."""

    out: Path
    existed: bool
    published: bool = False


@dataclass
class OutputLog:
    """The outputs a command began, outermost first, so that an interrupt can say what it
    left (the command line keeps one per command)."""

    expected: list[Path] = field(default_factory=list)  # -o as given, before any work
    records: list[OutputRecord] = field(default_factory=list)

    def began(self, out: Path, existed: bool) -> OutputRecord:
        self.records.append(OutputRecord(out, existed))
        return self.records[-1]

    def outcome(self) -> str:
        """What an interrupt left, in words: nothing written (an existing output kept as it
        was), or the output complete because the interrupt came after it was in place."""
        first = self.records[0] if self.records else None
        if first is not None and first.published:
            return f"it came after {first.out} was written: that output is complete"
        out = first.out if first else (self.expected[0] if self.expected else None)
        existed = first.existed if first else out is not None and os.path.lexists(out)
        return f"nothing was written; {out} was kept as it was" if existed \
            else "nothing was written"


def _env_off(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclass(frozen=True)
class Options:
    """How a verb writes its outputs and runs its math, passed down to everything it calls.

    ``fsync``: flush an output to disk before it is renamed into place (``--no-fsync``, for
    scratch work, at the price of a power cut's safety). ``direct_io``: write merged weights
    past the page cache (O_DIRECT) where the file system allows. ``threads``: torch's threads
    while a merge streams and a GGUF merge's K-quant workers (None: half the cores, at most 4,
    and K-quant workers for the cores those leave idle; ``OMP_NUM_THREADS`` wins). The
    defaults follow ``LORATOOL_NO_FSYNC=1`` and ``LORATOOL_NO_DIRECT_IO=1`` when set.

    Example: ``loratool.merge("base/", ["a/"], "out/", options=Options(fsync=False))``.
    """

    fsync: bool = field(default_factory=lambda: not _env_off("LORATOOL_NO_FSYNC"))
    direct_io: bool = field(default_factory=lambda: not _env_off("LORATOOL_NO_DIRECT_IO"))
    threads: int | None = None
    log: OutputLog | None = field(default=None, compare=False, repr=False)


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
    """How ranks are chosen per module: a fixed rank, the smallest rank keeping a share of the
    energy, the smallest meeting a measured error, or a total budget split to minimise the
    error; ``max_rank`` caps any of them.

    Example::

        RankPolicy.rank(16)
        RankPolicy.of(max_error=0.05, max_rank=128)
    """

    kind: str  # "rank" | "energy" | "max_error" | "budget"
    value: float  # N, F or E (unused for a budget)
    max_rank: int | None = None
    budget: Budget | None = None

    @classmethod
    def rank(cls, n: int) -> "RankPolicy":
        """A fixed rank ``n`` (capped at each matrix's own)."""
        return cls.from_options(n, None, None, None)

    @classmethod
    def of(cls, *, rank: int | None = None, energy: float | None = None,
           max_error: float | None = None, budget: str | int | None = None,
           max_rank: int | None = None) -> "RankPolicy":
        """The policy one keyword names, as the command line's flags do (checked the same
        way): ``RankPolicy.of(max_error=0.05, max_rank=64)``, ``RankPolicy.of(budget="50MB")``.
        """
        return cls.from_options(rank, energy, max_error,
                                None if budget is None else str(budget), max_rank)

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


@dataclass
class Fixed:
    """Something written whatever the ranks (full tensors, biases), with the option that would
    leave it out (None when nothing would)."""

    label: str
    cost: int
    hint: str | None = None


def check_fixed(policy: RankPolicy, fixed: list[Fixed]) -> None:
    """Refuse as soon as what is written whatever the ranks exceeds the budget."""
    budget = policy.budget
    if budget is None:
        return
    total = sum(f.cost for f in fixed)
    if total > budget.amount:
        parts = {}
        for f in fixed:
            parts[f.label] = parts.get(f.label, 0) + f.cost
        raise LoraToolError(f"--budget {budget.describe()} is less than the {total:,} "
                            f"{budget.unit} written whatever the ranks ("
                            + ", ".join(f"{k}: {v:,}" for k, v in parts.items()) + ")"
                            + budget_hints(fixed))


def budget_hints(fixed: list[Fixed]) -> str:
    """The options that would leave the largest fixed parts out, with their size."""
    saved: dict[str, int] = {}
    for f in fixed:
        if f.hint:
            saved[f.hint] = saved.get(f.hint, 0) + f.cost
    if not saved:
        return ""
    return "; " + ", ".join(f"{h} saves {n:,}" for h, n in
                            sorted(saved.items(), key=lambda kv: -kv[1]))
