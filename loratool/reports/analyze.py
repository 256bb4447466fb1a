"""What ``analyze`` reports: per module the spectrum of ΔW, its effective ranks, error curve
and amplification (a fine-tune, or one adapter), or the subspace similarity φ of two
adapters; the extract it suggests, the pictures written; and their text.

Example::

    report = loratool.analyze(["base/", "tuned/"])
    report.modules[0].effective_rank["0.9"], report.suggest.command
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from .base import Report, optional
from .text import listing, num, ranks_text, ratio, table

_BARS = "▁▂▃▄▅▆▇█"


@dataclass
class SpectrumMeasures:
    """What a spectrum says (``analyze`` and ``extract --report`` give it): the leading
    singular values, the rank that keeps each fraction of ‖M‖² (None where the values computed
    do not reach it), and the Eckart–Young error of every rank they cover."""

    singular_values: list[float]
    computed: int  # singular values computed (more than shown where fewer are kept)
    captured_energy: float  # Σσᵢ²/‖M‖² of those computed
    effective_rank: dict[str, int | None]  # by energy ("0.9"): the rank that keeps it
    error_curve: list[float]  # ‖M − M_r‖/‖M‖ for r = 0 … len(singular_values)


@dataclass
class Amplification:
    """‖ΔW‖/‖UᵀWV‖ at ``rank`` for ΔW's top directions (``factor``) and for as many random
    ones (``random``); None where W holds none of those directions (an all-zero weight)."""

    rank: int
    factor: float | None
    random: float | None


@dataclass
class FinetuneModule:
    """One weight matrix a fine-tune changed: ΔW = W_tuned − W_base, measured. The spectrum
    measures are fields of their own (the JSON has them flat, beside the rest)."""

    name: str
    tensor: str
    layout: str
    shape: list[int]
    rel_delta: float | None  # ‖ΔW‖/‖W‖; None where W is all zero
    needs_embed_lora: bool  # extract stores this one in full unless --embed-lora
    singular_values: list[float]
    computed: int
    captured_energy: float
    effective_rank: dict[str, int | None]
    error_curve: list[float]
    delta_norm: float
    svd: str  # "randomized" or "exact"
    full_rank: int
    amplification: Amplification | None


@dataclass
class AdapterModule:
    """One adapter module: ΔW = s·B·A, measured from its factors."""

    name: str
    layout: str
    rank: int
    scale: float
    singular_values: list[float]
    computed: int
    captured_energy: float
    effective_rank: dict[str, int | None]
    error_curve: list[float]
    delta_norm: float
    svd: str
    # ‖ΔW‖/‖W‖: absent without a base weight; NaN (null in JSON) where W is all zero
    rel_delta: float | None = optional()
    amplification: Amplification | None = None


@dataclass
class Suggestion:
    """The extract that keeps ``energy`` of every ΔW: its ranks and parameters (None where
    extract would fuse experts, so that the ranks here are not its ranks)."""

    energy: float
    ranks: list[int]  # the smallest and the largest
    parameters: int | None
    command: str


@dataclass
class PlotsWritten:
    folder: str
    files: list[str]


@dataclass
class Written:
    """The pictures ``--plot`` and ``--html`` wrote."""

    plot: PlotsWritten | None = optional()
    html: str | None = optional()


@dataclass
class FinetuneAnalysis(Report):
    """How low-rank the changes of a fine-tune are, and the extract that keeps them."""

    mode: Literal["finetune"]
    base: str
    tuned: str
    modules: list[FinetuneModule]
    other_changed: list[str]  # changed tensors that are not matrices (norms, biases)
    fused_experts: bool  # extract factorises experts' gate and up together: other ranks
    energies: list[float]
    seconds: float
    suggest: Suggestion | None  # None where some module does not reach the middle energy
    written: Written | None = optional()

    def render(self) -> str:
        lines = _spectrum_table(f"{self.tuned} against {self.base}", self.modules,
                                self.energies, self.seconds, ranked=False)
        if self.other_changed:
            lines.append(f"also changed, not matrices: {len(self.other_changed)} tensors "
                         "(norms, biases, routers)")
        s = self.suggest
        if s:
            lines.append(f"to keep {100 * s.energy:g} % of every ΔW: {s.command}   # ranks "
                         f"{ranks_text(s.ranks)}"
                         + (f", {s.parameters:,} parameters in the factors"
                            if s.parameters is not None else ""))
        return "\n".join(lines)


@dataclass
class AdapterAnalysis(Report):
    """How low-rank an adapter's modules are (and, with a base, their amplification)."""

    mode: Literal["adapter"]
    adapter: str
    base: str | None
    modules: list[AdapterModule]
    energies: list[float]
    seconds: float
    written: Written | None = optional()

    def render(self) -> str:
        return "\n".join(_spectrum_table(f"adapter {self.adapter}", self.modules,
                                         self.energies, self.seconds, ranked=True))


@dataclass
class CompareModule:
    """φ(i, j) of one module two adapters share."""

    name: str
    ranks: list[int]
    phi: list[list[float]]  # the grid, up to 64 × 64
    phi_diagonal: list[float]
    phi_min_rank: float  # φ(k, k), k the smaller rank


@dataclass
class CompareAnalysis(Report):
    """The subspace similarity of two adapters, module by module."""

    mode: Literal["compare"]
    adapters: list[str]
    subspace: str  # "a" (the A factors') or "delta" (ΔW's)
    modules: list[CompareModule]
    changes_nothing: list[str]  # shared, but all zero in one adapter: not compared
    only_in_first: list[str]
    only_in_second: list[str]
    energies: list[float]
    seconds: float
    written: Written | None = optional()

    def render(self) -> str:
        rows = [["module", "ranks", "φ(1,1)", "φ(k,k)", "φ(i,i), i = 1…k"]]
        for m in self.modules:
            d = m.phi_diagonal
            rows.append([m.name, "/".join(map(str, m.ranks)), f"{d[0]:.3f}",
                         f"{m.phi_min_rank:.3f}", spark(d, 32, top=1.0)])
        lines = [f"{' and '.join(self.adapters)}: {len(self.modules)} modules in both; "
                 f"{self.seconds:.2f} s", ""] + table(rows, right={1, 2, 3})
        of = ("the A factors' right-singular vectors" if self.subspace == "a"
              else "ΔW's right-singular vectors")
        lines.append(f"(φ(i, j) = ‖V₁[:i]·V₂[:j]ᵀ‖² / min(i, j) of {of}: 1 where one subspace "
                     "holds the other, j/d for random ones (d inputs); k = the smaller rank)")
        for names, label in ((self.only_in_first, "only in the first"),
                             (self.only_in_second, "only in the second"),
                             (self.changes_nothing, "not compared, as they change nothing in "
                                                    "one adapter (a factor all zero)")):
            if names:
                lines.append(f"{len(names)} modules {label}: {listing(names)}")
        return "\n".join(lines)


Analysis = FinetuneAnalysis | AdapterAnalysis | CompareAnalysis


def spark(values: Sequence[float], width: int = 16, top: float | None = None) -> str:
    """A small bar per value, scaled to ``top`` (default the largest: a spectrum's σᵢ/σ₁)."""
    top = max(values[:width], default=0.0) if top is None else top
    if top <= 0:
        return ""
    return "".join(_BARS[min(7, max(0, round(7 * v / top)))] for v in values[:width])


def _spectrum_table(what: str, modules: Sequence[FinetuneModule | AdapterModule],
                    energies: list[float], seconds: float, ranked: bool) -> list[str]:
    """The compact table per module of a fine-tune's or an adapter's analysis (``ranked``:
    with the adapter's own rank of each)."""
    rows = [["module"] + (["rank"] if ranked else []) + ["‖ΔW‖/‖W‖"]
            + [f"r{100 * e:g}%" for e in energies] + ["amp (random)", "spectrum"]]
    for m in modules:
        amp = m.amplification
        rows.append([m.name] + ([str(m.rank)] if isinstance(m, AdapterModule) else [])
                    + [num(m.rel_delta)]
                    + [_rank(m.effective_rank[f"{e:g}"], m.computed) for e in energies]
                    + [f"{ratio(amp.factor)} ({ratio(amp.random)}) @{amp.rank}" if amp
                       else "-", spark(m.singular_values)])
    lines = [f"{what}: {len(modules)} modules; {seconds:.2f} s", ""]
    lines += table(rows, right=set(range(1, len(rows[0]) - 1)))
    lines.append(f"(r{100 * energies[0]:g}% …: the rank that keeps that share of ‖ΔW‖²; amp: "
                 "‖ΔW‖/‖UᵀWV‖ for ΔW's top directions, beside as many random ones)")
    return lines


def _rank(r: int | None, computed: int) -> str:
    return str(r) if r is not None else f">{computed}"
