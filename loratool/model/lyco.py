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

import torch

from ..errors import FormatError
from ..headers.kohya import KINDS, LOHA, LOKR, lyco_factors, lyco_rank, lyco_scale, lyco_shape
from ..numerics import ops


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
    # PEFT's r for its LoHa and LoKr (the config's, or rank_pattern's): its scale is alpha / r
    # even where LyCORIS' would be 1 (a LoKr with both sides whole)
    dim: int | None = None
    layout: str = field(init=False, default="linear")
    # a 2-D ΔW of LoHa or LoKr may be a linear layer's or a conv's stored flat; only the base
    # tells (fit_shape sets this)
    shape_from_base: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        shape = check(self)
        if not self.shape:
            self.shape = shape
        self.layout = "conv" if len(self.shape) > 2 else "linear"

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}" if self.component else self.name

    def is_zero(self) -> bool:
        """Whether ΔW is zero because a factor is (LyCORIS initialises one side so): LoHa's
        ΔW is a product of two products, LoKr's a Kronecker product of two, full's the diff."""
        def zero(*names: str) -> bool:
            return any(n in self.parts and not bool(self.parts[n].any()) for n in names)

        if self.kind == "loha":
            return zero("hada_w1_a", "hada_w1_b", "hada_t1") or zero("hada_w2_a", "hada_w2_b",
                                                                     "hada_t2")
        if self.kind == "lokr":
            return zero("lokr_w1", "lokr_w1_a", "lokr_w1_b") or zero(
                "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return all(not bool(t.any()) for t in self.parts.values())

    @property
    def rank(self) -> int:
        """LyCORIS' ``dim``: the rank of each factor pair (LoHa), of the factored side
        (LoKr; 0 when both sides are whole), 0 for a full module."""
        return self.dim if self.dim is not None else lyco_rank(self.kind, self._shapes())

    @property
    def scale(self) -> float:
        """alpha / dim (a missing or zero alpha means dim); 1 for a LoKr with both sides whole
        and for full modules, as LyCORIS defines it; PEFT's alpha / r for PEFT's."""
        if self.dim is not None:
            return float(self.alpha or 0.0) / self.dim if self.dim else 0.0
        return lyco_scale(self.alpha, self.rank)

    @property
    def multiplicative(self) -> bool:
        return False

    def fit_base(self, have: tuple[int, ...]) -> bool:
        """Take the base weight's shape, if this module's ΔW fits it."""
        return fit_shape(self, have)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.parts.items()}

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
        return lyco_factors(self.kind, self._shapes())

    def num_params(self) -> int:
        return sum(t.numel() for t in self.parts.values()) + (
            self.magnitude.numel() if self.magnitude is not None else 0)

    def abs_delta(self) -> torch.Tensor:
        """The same products of |factors| and |scale| in float64: a bound on |ΔW|."""
        return self.delta(torch.float64, abs_=True)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              abs_: bool = False) -> torch.Tensor:
        """Dense ΔW in the base weight's shape (no DoRA normalisation). ``abs_``: the same
        products of |factors| and |scale|, a bound on |ΔW| for rounding-error bounds."""
        def g(name: str) -> torch.Tensor | None:
            t = self.parts.get(name)
            if t is None:
                return None
            t = t.to(device=device, dtype=dtype)
            return t.abs() if abs_ else t

        s = abs(self.scale) if abs_ else self.scale
        if self.kind == "loha":
            d = ops.loha_delta(*(g(n) for n in LOHA), s)  # type: ignore[arg-type]
        elif self.kind == "lokr":
            d = ops.lokr_delta(*(g(n) for n in LOKR), s)  # type: ignore[arg-type]
        else:  # a copy: callers change ΔW in place
            d = self.parts["diff"].to(device=device, dtype=dtype, copy=True)
            d = d.abs_() if abs_ else d
        return d if not self.shape else d.reshape(self.shape)


def check(m: LycoModule) -> tuple[int, ...]:
    """The tensors a kind needs are there, their shapes agree, nothing is NaN: else a clear
    error naming the module. Returns the shape of its ΔW."""
    where = f"{m.key}: {m.kind} module"
    extra = set(m.parts) - set(KINDS[m.kind])
    if extra:
        raise FormatError(f"{where} also has {', '.join(sorted(extra))}: a mixture of LyCORIS "
                          "types the file's module cannot be")
    shape = lyco_shape(m.kind, m._shapes(), where)
    for n, t in m.parts.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise FormatError(f"{where}: {n} is not finite floating-point data; the adapter "
                              "is damaged")
    if m.alpha is not None and not math.isfinite(m.alpha):
        raise FormatError(f"{where}: alpha is {m.alpha}, not a finite number")
    return shape


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
