"""What ``extract`` reports: per module the rank chosen and the error measured on the stored
factors, the totals, and what a user should know (notes); and its text.

Example::

    report = loratool.extract("base/", "tuned/", "adapter/", policy=RankPolicy.rank(16))
    report.totals.max_rel_error, [m.rank for m in report.modules]
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import human_bytes
from .analyze import SpectrumMeasures
from .base import Report
from .text import LAYER, num, table


@dataclass
class ExtractedModule:
    """One factorised matrix: its rank and what the stored factors lose."""

    name: str
    tensor: str
    layout: str
    rank: int
    full_rank: int
    rel_error: float  # ‖ΔW − BA‖/‖ΔW‖, measured on the stored factors
    kept_energy: float  # Σ_{i≤k} σ²/‖ΔW‖²
    delta_norm: float
    rel_delta: float  # ‖ΔW‖/‖W‖ (not finite, so null in JSON, where ‖W‖ is 0)
    shape: list[int]
    svd: str  # "randomized" or "exact"
    analysis: SpectrumMeasures  # what `loratool analyze` gives, from the same SVD


@dataclass
class ExtractTotals:
    lora_modules: int
    parameters: int
    bytes: int
    max_rel_error: float
    total_rel_error: float  # over all modules: sqrt(Σ error²/Σ ‖ΔW‖²)
    ranks: list[int]


@dataclass
class ExtractReport(Report):
    """An extracted adapter."""

    base: str
    tuned: str
    output: str
    format: str
    policy: str
    seed: int
    svd: str
    device: str
    modules: list[ExtractedModule]
    full_tensors: list[str]  # stored in full (modules_to_save)
    dropped: list[str]  # --skip-full
    bias_deltas: list[str]  # bias changes stored as lora_B.bias
    unchanged_tensors: int
    totals: ExtractTotals
    notes: list[str]
    seconds: float

    def render(self, expand: bool = False) -> str:
        """Per (folded) module: rank and errors; then the totals."""
        t = self.totals
        lines = [f"wrote {self.output}: {self.format} adapter, {t.lora_modules} LoRA modules, "
                 f"{len(self.full_tensors)} full tensors, {t.parameters:,} parameters "
                 f"({human_bytes(t.bytes)}); {self.policy}, {self.svd} SVD, seed {self.seed}, "
                 f"{self.seconds:.2f} s on {self.device}"]
        rows = [["module", "count", "rank", "rel. error", "kept energy", "‖ΔW‖/‖W‖"]]
        groups: dict[tuple[str, int | None], list[ExtractedModule]] = {}
        for m in self.modules:
            groups.setdefault((LAYER.sub("*", m.name), m.rank if expand else None),
                              []).append(m)
        for (name, _), ms in groups.items():
            ranks = sorted({m.rank for m in ms})
            rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
            rows.append([ms[0].name if len(ms) == 1 else name,
                         f"×{len(ms)}" if len(ms) > 1 else "", rank,
                         num(max(m.rel_error for m in ms)),
                         f"{min(m.kept_energy for m in ms):.4f}",
                         num(max(m.rel_delta or 0.0 for m in ms))])
        if len(rows) > 1:
            lines.append("")
            lines += table(rows, right={1, 2, 3, 4, 5})
            lines.append("(per group: largest error, smallest kept energy, largest ‖ΔW‖/‖W‖)")
        lines.append("")
        lines.append(f"error ‖ΔW − BA‖/‖ΔW‖ measured on the stored factors: max "
                     f"{t.max_rel_error:.4g}, over all modules {t.total_rel_error:.4g}")
        if self.full_tensors:
            lines.append(f"stored in full (modules_to_save): {', '.join(self.full_tensors[:6])}"
                         + (" …" if len(self.full_tensors) > 6 else "")
                         + " — not LoRA-able; --skip-full drops norms")
        if self.bias_deltas:
            lines.append(f"bias changes as lora_B.bias: {len(self.bias_deltas)}")
        if self.dropped:
            lines.append(f"dropped (--skip-full): {', '.join(self.dropped[:6])}")
        lines.append(f"unchanged tensors skipped: {self.unchanged_tensors}")
        return "\n".join(lines)

    def card_note(self) -> str:
        """The model card's account of how the adapter was made and what it loses."""
        t = self.totals
        lines = [f"Extracted by loratool from `{self.tuned}` against `{self.base}` with a "
                 f"truncated {self.svd} SVD of each weight difference.", "",
                 f"- rank policy: {self.policy}; seed {self.seed}",
                 f"- relative Frobenius error ‖ΔW − BA‖/‖ΔW‖, measured on the stored factors: "
                 f"max {t.max_rel_error:.4g}, over all modules {t.total_rel_error:.4g}",
                 f"- {t.lora_modules} LoRA modules (ranks {', '.join(map(str, t.ranks))}), "
                 f"{len(self.full_tensors)} full tensors, {t.parameters:,} parameters"]
        if self.dropped:
            lines.append(f"- dropped (--skip-full): {', '.join(self.dropped[:8])}")
        return "\n".join(lines)
