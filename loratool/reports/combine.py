"""What ``combine`` and ``resize`` report: per module the inputs' ranks, the rank written and
the error measured on the stored factors, and the totals; and their text.

Example::

    report = loratool.combine(["a/", "b/"], "both/", method="cat", weights=[0.7, 1.0])
    report.totals.ranks, report.totals.max_rel_error
    print(report.render())
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import human_bytes
from .base import Report, optional
from .text import fold, num, ranks_text, table


@dataclass
class CombineModule:
    """One module of the result: how many inputs had it, their ranks, the rank written and
    its relative error ‖ΔW − BA‖/‖ΔW‖ (against the exact sum, the method's dense result, or
    for resize the input)."""

    name: str
    inputs: int
    input_ranks: list[int]
    total_norm: float | None = optional()  # svd and resize: ‖Σ wᵢ·ΔWᵢ‖
    rank: int = 0
    rel_error: float = 0.0
    kept_energy: float | None = optional()  # absent for cat (nothing is truncated)


@dataclass
class CombineTotals:
    """The written adapter as a whole."""

    lora_modules: int
    parameters: int
    bytes: int
    max_rel_error: float
    input_ranks: list[int]
    ranks: list[int]


@dataclass
class CombineReport(Report):
    """A combine of adapters (or the resize of one) written to ``output``."""

    operation: str  # "combine" or "resize"
    inputs: list[str]
    weights: list[float]
    method: str
    output: str
    format: str
    policy: str | None  # None for cat (the exact sum takes no rank policy)
    density: float | None  # ties, dare_* and magnitude_prune only
    seed: int
    modules: list[CombineModule]
    notes: list[str]
    totals: CombineTotals
    seconds: float

    def render(self, expand: bool = False) -> str:
        """Totals, then rank and measured error per (folded) module; ``expand``: every
        module on its own line."""
        t = self.totals
        resize = self.operation == "resize"
        what = (f"ranks {ranks_text(t.input_ranks)} → {ranks_text(t.ranks)}" if resize else
                f"method {self.method}, ranks {ranks_text(t.ranks)}")
        lines = [f"wrote {self.output}: {self.format} adapter, {t.lora_modules} LoRA modules, "
                 f"{what}, {t.parameters:,} parameters ({human_bytes(t.bytes)})"
                 + (f"; {self.policy}" if self.policy else "") + f"; {self.seconds:.2f} s"]
        rows = [["module", "count", "rank", "rel. error"]]
        for name, ms in fold(self.modules, lambda m: m.name, expand):
            ranks = sorted({m.rank for m in ms})
            rows.append([name, f"×{len(ms)}" if len(ms) > 1 else "", ranks_text(ranks),
                         num(max(m.rel_error or 0.0 for m in ms))])
        if len(rows) > 1:
            lines += [""] + table(rows, right={1, 2, 3})
        against = ("the input" if resize else "the exact weighted sum" if self.method in (
            "svd", "cat") else "the method's dense result")
        lines += ["", f"error ‖ΔW − BA‖/‖ΔW‖ against {against}, measured on the stored "
                      f"factors: max {t.max_rel_error:.4g}"]
        return "\n".join(lines)
