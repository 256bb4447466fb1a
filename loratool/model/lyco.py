"""LyCORIS modules that are not plain LoRA: LoHa, LoKr and full (``diff``) modules.

Each holds its tensors as the file stores them and computes its dense ΔW by LyCORIS'
definitions (ops.loha_delta / ops.lokr_delta): merge and unmerge add or subtract it like a
LoRA's, and ``convert`` / ``resize`` turn it into plain LoRA at a rank policy. LoCon (LoRA on
convolutions, also in its Tucker form) is plain LoRA and never reaches this module.

Example::
    m = LycoModule("down_blocks.0.attentions.0.proj_in", "loha", parts, alpha=2.0)
    m.delta().shape, m.rank, m.scale
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError
from ..numerics import ops

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
KINDS = {"loha": LOHA, "lokr": LOKR, "full": FULL}
# LyCORIS algorithms whose ΔW is not a sum of products of stored factors (or that change
# norm layers): named when refused
UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "diag-OFT", "boft": "BOFT",
               "a1.weight": "GLoRA", "w_norm": "norm-layer", "b_norm": "norm-layer",
               "weight": "IA3", "on_input": "IA3"}


@dataclass
class LycoModule:
    """One LyCORIS module. ``shape`` is the base weight's shape: read from the factors, and
    set from the base for a LoHa or LoKr conv stored flat ([out, in·kh·kw])."""

    name: str
    kind: str  # "loha" | "lokr" | "full"
    parts: dict[str, torch.Tensor]
    alpha: float | None
    shape: tuple[int, ...] = ()
    magnitude: torch.Tensor | None = None  # dora_scale, per output row
    component: str | None = None
    layout: str = field(init=False, default="linear")
    # a 2-D ΔW of LoHa or LoKr may be a linear layer's or a conv's stored flat; only the base
    # tells (fit_shape sets this)
    shape_from_base: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        check(self)
        if not self.shape:
            self.shape = tuple(self.delta(torch.float32, abs_=True, cheap=True).shape)
        self.layout = "conv" if len(self.shape) > 2 else "linear"

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}" if self.component else self.name

    @property
    def rank(self) -> int:
        """LyCORIS' ``dim``: the rank of each factor pair (LoHa), of the factored side
        (LoKr; 0 when both sides are whole), 0 for a full module."""
        p = self.parts
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            side = p.get("lokr_w1_b", p.get("lokr_w2_b"))
            return int(side.shape[0]) if side is not None else 0
        return 0

    @property
    def scale(self) -> float:
        """alpha / dim (a missing or zero alpha means dim); 1 for a LoKr with both sides whole
        and for full modules, as LyCORIS defines it."""
        r = self.rank
        if not r or not self.alpha:
            return 1.0
        return float(self.alpha) / r

    @property
    def bias(self) -> torch.Tensor | None:
        """A full module's bias change (``diff_b``), added as is."""
        return self.parts.get("diff_b")

    @property
    def base_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def error_terms(self) -> int:
        """Products summed per element of ΔW, for the float32 rounding bound of --verify."""
        r = max(self.rank, 1)
        if self.kind == "loha":
            return (r * r + 2 * r if "hada_t1" in self.parts else 2 * r) + 2
        if self.kind == "lokr":
            return r * r + 2 * r + 3
        return 1

    def describe(self) -> str:
        """The factor shapes in one line: ``(8×4 · 4×8) ⊙ (8×4 · 4×8)``, ``2×2 ⊗ 4×4``."""
        def dims(name: str) -> str:
            t = self.parts.get(name)
            return "×".join(map(str, t.shape)) if t is not None else ""

        p = self.parts
        if self.kind == "loha":
            t = " Tucker" if "hada_t1" in p else ""
            return f"({dims('hada_w1_a')}·{dims('hada_w1_b')}) ⊙ ({dims('hada_w2_a')}·" \
                   f"{dims('hada_w2_b')}){t}"
        if self.kind == "lokr":
            w1 = dims("lokr_w1") or f"{dims('lokr_w1_a')}·{dims('lokr_w1_b')}"
            w2 = dims("lokr_w2") or f"{dims('lokr_w2_a')}·{dims('lokr_w2_b')}" + (
                " Tucker" if "lokr_t2" in p else "")
            return f"{w1} ⊗ {w2}"
        return f"diff {dims('diff')}" + (" + diff_b" if "diff_b" in p else "")

    def num_params(self) -> int:
        return sum(t.numel() for t in self.parts.values()) + (
            self.magnitude.numel() if self.magnitude is not None else 0)

    def abs_delta(self) -> torch.Tensor:
        """The same products of |factors| and |scale| in float64: a bound on |ΔW|."""
        return self.delta(torch.float64, abs_=True)

    def delta(self, dtype: torch.dtype = torch.float32, device: Any = None,
              abs_: bool = False, cheap: bool = False) -> torch.Tensor:
        """Dense ΔW in the base weight's shape (no DoRA normalisation). ``abs_``: the same
        products of |factors| and |scale|, a bound on |ΔW| for rounding-error bounds."""
        def g(name: str) -> torch.Tensor | None:
            t = self.parts.get(name)
            if t is None:
                return None
            if cheap:  # only the shape is wanted
                return torch.zeros(t.shape, dtype=torch.float32, device="meta")
            t = t.to(device=device, dtype=dtype)
            return t.abs() if abs_ else t

        s = abs(self.scale) if abs_ else self.scale
        if self.kind == "loha":
            d = ops.loha_delta(*(g(n) for n in LOHA), s)  # type: ignore[arg-type]
        elif self.kind == "lokr":
            d = ops.lokr_delta(*(g(n) for n in LOKR), s)  # type: ignore[arg-type]
        elif cheap:
            d = g("diff")  # type: ignore[assignment]
        else:  # a copy: callers change ΔW in place
            d = self.parts["diff"].to(device=device, dtype=dtype, copy=True)
            d = d.abs_() if abs_ else d
        return d if cheap or not self.shape else d.reshape(self.shape)


def check(m: LycoModule) -> None:
    """The tensors a kind needs are there, their shapes agree, nothing is NaN: else a clear
    error naming the module."""
    where = f"{m.key}: {m.kind} module"
    p = m.parts
    extra = set(p) - set(KINDS[m.kind])
    if extra:
        raise FormatError(f"{where} also has {', '.join(sorted(extra))}: a mixture of LyCORIS "
                          "types the file's module cannot be")
    need = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "lokr": (), "full": ("diff",)}[m.kind]
    missing = [n for n in need if n not in p]
    if m.kind == "lokr":
        missing += [f"lokr_w{i} or lokr_w{i}_a/_b" for i in (1, 2)
                    if f"lokr_w{i}" not in p and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(p)]
    if m.kind == "loha" and ("hada_t1" in p) != ("hada_t2" in p):
        missing.append("hada_t2" if "hada_t1" in p else "hada_t1")
    if missing:
        raise FormatError(f"{where} lacks {', '.join(missing)}; the file is incomplete")
    for n, t in p.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise FormatError(f"{where}: {n} is not finite floating-point data; the adapter "
                              "is damaged")
    if m.alpha is not None and not math.isfinite(m.alpha):
        raise FormatError(f"{where}: alpha is {m.alpha}, not a finite number")
    try:
        m.delta(cheap=True)  # every product's shapes agree
    except RuntimeError as e:
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in p.items())
        raise FormatError(f"{where}: the factors do not fit together ({shapes})") from e


def fit_shape(m: LycoModule, have: tuple[int, ...]) -> bool:
    """Adopt the base weight's shape when ΔW is the same numbers (a conv stored flat)."""
    if tuple(m.shape) == tuple(have):
        m.shape_from_base = True
        return True
    if have and m.shape and have[0] == m.shape[0] and math.prod(have) == math.prod(m.shape):
        m.shape = tuple(have)
        m.layout = "conv" if len(have) > 2 else "linear"
        m.shape_from_base = True
        return True
    return False
