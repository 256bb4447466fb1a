"""What ``convert`` reports: what was written and what was left out, the LyCORIS modules made
LoRA (rank and measured error each) and, for GGUF, the alpha the file shares; and its text.

Example::

    report = loratool.convert("adapter/", "lora.safetensors", "kohya")
    report.modules, report.dropped
    print(report.render())
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .base import Report, optional
from .text import KIND, counts, fold, listing, ranks_text


@dataclass
class LycorisModule:
    """One LyCORIS module (LoHa, LoKr or full) made LoRA: the rank it got and the relative
    error of the stored factors against its dense ΔW."""

    name: str
    type: str  # "loha", "lokr" or "full"
    rank: int
    rel_error: float
    kept_energy: float


@dataclass
class LycorisPart:
    """The LyCORIS modules of a convert, made LoRA at one rank policy."""

    policy: str
    modules: list[LycorisModule]
    max_rel_error: float


@dataclass
class GgufInfo:
    """What the GGUF writer did: the one ``adapter.lora.alpha`` every module shares, and the
    modules whose lora_b was rescaled to share it (``inexact``: by a factor that rounds)."""

    alpha: float
    modules: int
    rescaled: int
    inexact: list[str]


@dataclass
class ConvertReport(Report):
    """An adapter written in another format."""

    input: str
    source_format: str
    format: str
    modules: int
    full_tensors: int
    dropped: list[str]  # what --drop-unsupported dropped
    base_copies_left_out: list[str]  # full tensors equal to the base's
    rank_0_left_out: list[str]
    lycoris: LycorisPart | None = optional()
    output: str = ""
    gguf: GgufInfo | None = optional()
    # modules written that diffusers' kohya-Flux loader leaves out when it loads the file
    diffusers_drops: list[str] | None = optional()

    def render(self) -> str:
        lines = [f"wrote {self.output}: {self.format} adapter, {self.modules} LoRA modules, "
                 f"{self.full_tensors} full tensors (from {self.source_format})"]
        for lost in self.dropped:
            lines.append(f"  dropped (--drop-unsupported): {lost}")
        same, empty = self.base_copies_left_out, self.rank_0_left_out
        if same:
            lines.append(f"  left out {len(same)} full tensor(s) equal to the base's "
                         f"({same[0]} …): merging them changes nothing")
        if empty:
            lines.append(f"  left out {len(empty)} module(s) of rank 0 ({empty[0]} …): they "
                         "change nothing")
        if self.lycoris:
            lines += lycoris_lines(self.lycoris)
        if self.diffusers_drops:
            lines.append(f"  note: diffusers' kohya-Flux loader (0.42) leaves "
                         f"{len(self.diffusers_drops)} module(s) of this file out when it "
                         f"loads it ({listing(self.diffusers_drops, 3)}), so in diffusers the "
                         "adapter acts without them; ComfyUI and sd-scripts load them; for "
                         "diffusers write --to diffusers")
        g = self.gguf
        if g and g.rescaled:
            lines.append(f"  adapter.lora.alpha = {g.alpha:g}; lora_b of {g.rescaled} "
                         "modules rescaled to share it"
                         + (f" ({len(g.inexact)} by a factor that is not a power of two: one "
                            "rounding)" if g.inexact else " (exactly: powers of two)"))
        elif g:
            lines.append(f"  adapter.lora.alpha = {g.alpha:g}: every module's scale is alpha / "
                         "rank, nothing rescaled")
        return "\n".join(lines)


def lycoris_lines(ly: LycorisPart) -> list[str]:
    """The LyCORIS modules made LoRA: their kinds, then the 12 worst (folded) groups."""
    kinds = Counter(KIND[m.type] for m in ly.modules)
    label = "LyCORIS" if all(m.type in ("loha", "lokr", "full") for m in ly.modules) else \
        "non-LoRA"
    lines = [f"  {len(ly.modules)} {label} modules ({counts(kinds)}) made LoRA at "
             f"{ly.policy}; largest relative error {ly.max_rel_error:.4g}"
             + ("; the 12 worst groups (--json lists all):" if len(ly.modules) > 12 else "")]
    groups = sorted(fold(ly.modules, lambda m: m.name),  # the worst first
                    key=lambda g: -max(m.rel_error for m in g[1]))[:12]
    for name, ms in groups:
        lines.append(f"    {name}: {KIND[ms[0].type]} → rank "
                     f"{ranks_text(sorted({m.rank for m in ms}))}, error ≤ "
                     f"{max(m.rel_error for m in ms):.3g} (×{len(ms)})")
    return lines
