"""PEFT's tuners that are neither LoRA nor LyCORIS' LoHa/LoKr: AdaLoRA and VeRA (additive,
low-rank), IA³ (a scaling vector) and OFT and BOFT (rotations). PEFT's LoHa and LoKr are
LyCORIS' math and are read into ``lyco.LycoModule``.

Each module holds its tensors as PEFT saves them and computes what PEFT's ``merge()`` does,
with PEFT's operations in PEFT's order so that float32 results agree bit for bit:

- additive (``adalora``, ``vera``): :meth:`TunerModule.delta`, added like a LoRA's ΔW;
- multiplicative (``ia3``, ``oft``, ``boft``): :meth:`TunerModule.apply`, W·diag(l) or
  diag(l)·W (IA³, which also scales the bias of an output-side vector), R·Wᵀ (OFT's
  block-diagonal Cayley rotation of the inputs), (M·Wᵀ)ᵀ·s (BOFT's butterfly of rotations,
  then a per-row scale). Their ΔW depends on W: :meth:`delta` needs ``base_weight``.

The rotations' float32 matrices come from ``numerics.rotations``.

Example::
    m = TunerModule("model.layers.0.mlp.down_proj", "ia3", {"ia3_l": l}, {})
    m.apply(W.clone(), +1.0)      # W * l, as PEFT's merge
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from ..headers.peft_tuners import TUNER_NAMES, factors_text, tuner_params
from ..numerics import rotations

ADDITIVE = ("adalora", "vera")
MULTIPLICATIVE = ("ia3", "oft", "boft")


@dataclass
class TunerModule:
    """One module of a PEFT tuner. ``settings``: what the config says of it (AdaLoRA's scaling
    and ranknum, OFT's Cayley settings, ``fan_in_fan_out``). ``shape``: the base weight's,
    set by :meth:`fit_base` (IA³, VeRA and OFT's tensors give only one side of it)."""

    name: str
    kind: str  # adalora | vera | ia3 | oft | boft
    parts: dict[str, torch.Tensor]
    settings: dict[str, object] = field(default_factory=dict)
    component: str | None = None
    shape: tuple[int, ...] = ()
    # the base weight, for the ΔW of a multiplicative module (convert --base sets it)
    base_weight: torch.Tensor | None = field(default=None, repr=False)
    alpha: float | None = None
    magnitude: None = None  # no DoRA
    bias: None = None  # no additive bias; IA³'s bias scaling is scales_bias
    layout: str = "linear"
    shape_from_base: bool = field(init=False, default=False)
    # IA³ on outputs scales the base's bias: b·l − b, for a LoRA made of it (convert sets it)
    bias_change: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        where = f"{self.key}: {TUNER_NAMES[self.kind]} module"
        for n, t in self.parts.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise FormatError(f"{where}: {n} is not finite floating-point data; the "
                                  "adapter is damaged")
        if self.kind == "adalora":  # its tensors give the shape: [out, r] · [r, in]
            shape = (int(self.parts["lora_B"].shape[0]), int(self.parts["lora_A"].shape[1]))
            self.shape = shape[::-1] if self.settings.get("fan_in_fan_out") else shape
        if self.kind in ("oft", "boft") and self.settings.get("fan_in_fan_out"):
            raise FormatError(f"{where}: fan_in_fan_out (GPT-2's Conv1D) is not supported for "
                              "rotations")

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}" if self.component else self.name

    @property
    def multiplicative(self) -> bool:
        return self.kind in MULTIPLICATIVE

    @property
    def scales_bias(self) -> bool:
        """IA³ on a layer's outputs (not a feedforward one) scales its bias too."""
        return self.kind == "ia3" and self.parts["ia3_l"].shape[-1] == 1

    @property
    def rank(self) -> int:
        """AdaLoRA's kept rank, VeRA's r; 0 for the others (see :attr:`block_size`)."""
        if self.kind == "adalora":
            return int(self.parts["lora_A"].shape[0])
        if self.kind == "vera":
            return int(self.parts["vera_lambda_d"].shape[0])
        return 0

    @property
    def block_size(self) -> int | None:
        """OFT's and BOFT's rotation block size."""
        if self.kind == "oft":
            return rotations.oft_block_size(self.parts["oft_R.weight"].shape[1])
        if self.kind == "boft":
            return int(self.parts["boft_R"].shape[-1])
        return None

    @property
    def scale(self) -> float:
        """AdaLoRA's scaling / (ranknum + 1e-5); 1 for the others (a vector's or a
        rotation's effect is in its values)."""
        if self.kind == "adalora":
            return float(self.settings["scaling"]) / (float(self.settings["ranknum"]) + 1e-5)
        return 1.0

    @property
    def base_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def error_terms(self) -> int:
        """Products summed per element, for --verify's float32 rounding bound."""
        if self.kind == "adalora":
            return self.rank + 3
        if self.kind == "vera":
            return self.rank + 2
        if self.kind == "ia3":
            return 1
        b = self.block_size or 1
        terms = int(self.settings.get("num_cayley_neumann_terms", 5))
        return b * (terms + 2) + 3  # the rotation's powers, then its product with W

    def describe(self) -> str:
        return factors_text(self.kind, {n: tuple(t.shape) for n, t in self.parts.items()},
                            self.settings)

    def num_params(self) -> int:
        return tuner_params(self.kind, {n: tuple(t.shape) for n, t in self.parts.items()})

    def is_zero(self) -> bool:
        """Whether merging changes nothing: IA³'s l all ones, a rotation's generator all
        zeros (the Cayley map of 0 is I) with BOFT's scale all ones, an additive module with a
        zero factor."""
        p = self.parts
        if self.kind == "ia3":
            return bool((p["ia3_l"] == 1).all())
        if self.kind == "oft":
            return not bool(p["oft_R.weight"].any())
        if self.kind == "boft":
            return not bool(p["boft_R"].any()) and bool((p["boft_s"] == 1).all())
        names = ("lora_A", "lora_E", "lora_B") if self.kind == "adalora" else (
            "vera_lambda_b", "vera_lambda_d")
        return any(not bool(p[n].any()) for n in names)

    def fit_base(self, have: tuple[int, ...]) -> bool:
        """Take the base weight's shape, if this module fits it."""
        if len(have) != 2:
            return False
        out, n_in = have
        p = self.parts
        fan = bool(self.settings.get("fan_in_fan_out"))
        if fan and self.kind in ("adalora", "vera", "ia3"):
            n_in, out = out, n_in  # PEFT transposes ΔW (or l) for a [in, out] weight
        if self.kind == "adalora":
            ok = tuple(p["lora_A"].shape)[1] == n_in and tuple(p["lora_B"].shape)[0] == out
        elif self.kind == "vera":
            ok = p["vera_lambda_b"].shape[0] == out and p["vera_A"].shape[1] >= n_in and \
                p["vera_B"].shape[0] >= out
        elif self.kind == "ia3":
            ok = tuple(p["ia3_l"].shape) in ((1, n_in), (out, 1))
        elif self.kind == "oft":
            ok = rotations.oft_fits(p["oft_R.weight"].shape, n_in, self.settings)
        else:
            ok = p["boft_R"].shape[1] * p["boft_R"].shape[2] == n_in and \
                tuple(p["boft_s"].shape) == (out, 1)
        if ok:
            self.shape, self.shape_from_base = tuple(have), True
        return ok

    # ------------------------------------------------------------------ the math

    def _need_shape(self) -> tuple[int, int]:
        if len(self.shape) != 2:
            raise FormatError(f"{self.key}: the {TUNER_NAMES[self.kind]} module's weight shape "
                              "comes from the base model; pass --base BASE")
        return self.shape[0], self.shape[1]

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
              ) -> torch.Tensor:
        """Dense ΔW in the base weight's shape, as PEFT's ``get_delta_weight`` computes it
        (additive kinds), or apply(W) − W for the multiplicative ones (needs ``base_weight``).
        """
        g = {n: t.to(device=device, dtype=dtype) for n, t in self.parts.items()}
        fan = bool(self.settings.get("fan_in_fan_out"))
        if self.kind == "adalora":
            # PEFT: transpose(B @ (A * E), fan) * scaling / (ranknum + 1e-5), ranknum a
            # float32 tensor
            ranknum = torch.tensor([float(self.settings["ranknum"])], dtype=dtype,
                                   device=device) + 1e-5
            d = g["lora_B"] @ (g["lora_A"] * g["lora_E"])
            return (d.T if fan else d) * self.settings["scaling"] / ranknum  # type: ignore
        if self.kind == "vera":
            out, n_in = self._need_shape()
            if fan:
                out, n_in = n_in, out
            A, B = g["vera_A"][:, :n_in], g["vera_B"][:out, :]
            d = (g["vera_lambda_b"].unsqueeze(-1) * B) @ (g["vera_lambda_d"].unsqueeze(-1) * A)
            return d.T if fan else d
        if self.base_weight is None:
            raise FormatError(f"{self.key}: the change a {TUNER_NAMES[self.kind]} module makes "
                              "depends on the base weight: pass --base BASE")
        W = self.base_weight.to(device=device, dtype=dtype)
        return self.apply(W.clone(), +1.0) - W

    def abs_delta(self) -> torch.Tensor:
        """A float64 bound on |ΔW| of an additive module: the same products of |factors|."""
        g = {n: t.double().abs() for n, t in self.parts.items()}
        if self.kind == "adalora":
            d = g["lora_B"] @ (g["lora_A"] * g["lora_E"]) * abs(self.scale)
            return d.T if self.settings.get("fan_in_fan_out") else d
        out, n_in = self._need_shape()
        fan = bool(self.settings.get("fan_in_fan_out"))
        if fan:
            out, n_in = n_in, out
        d = (g["vera_lambda_b"].unsqueeze(-1) * g["vera_B"][:out]) @ (
            g["vera_lambda_d"].unsqueeze(-1) * g["vera_A"][:, :n_in])
        return d.T if fan else d

    def apply(self, W: torch.Tensor, sign: float) -> torch.Tensor:
        """The merged (sign +1) or unmerged (−1) weight, or bias (1-D: IA³ scales it). Merge
        is PEFT's own operations; unmerge the exact inverse (division by l, the rotation's
        inverse computed in float64), not PEFT's approximations (l + 1e-8, Rᵀ)."""
        dt, dev = W.dtype, W.device
        if self.kind == "ia3":
            l = self.parts["ia3_l"].to(dev, dt)
            if W.dim() == 1:
                l = l.reshape(W.shape)
            elif self.settings.get("fan_in_fan_out"):
                l = l.T
            if sign > 0:
                return torch.mul(W, l)
            if not bool(l.all()):
                raise FormatError(f"{self.key}: IA³'s l has zeros; a merge with them cannot be "
                                  "undone (those weights are 0 now)")
            return torch.div(W, l)
        if self.kind == "oft":
            R = rotations.oft_matrix(self.parts["oft_R.weight"], self.settings, W.shape[1],
                                     inverse=sign < 0).to(dev, dt)
            return torch.mm(R, W.t()).t().contiguous()  # callers index it flat
        M = rotations.boft_matrix(self.parts["boft_R"], inverse=sign < 0).to(dev, dt)
        s = self.parts["boft_s"].to(dev, dt)
        if sign > 0:
            return (torch.transpose(torch.mm(M, torch.transpose(W, 0, 1)), 0, 1) * s
                    ).contiguous()
        if not bool(s.all()):
            raise FormatError(f"{self.key}: BOFT's scale has zeros; a merge with them cannot be "
                              "undone")
        return torch.mm(M, (W / s).t()).t().contiguous()

    def reference(self, W: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        """float64: the exact result of :meth:`apply` on ``W`` (the rotation computed in
        float64 too) and the absolute-value sum that bounds apply's float32 rounding."""
        W = W.double()
        if self.kind == "ia3":
            l = self.parts["ia3_l"].double()
            l = l.reshape(W.shape) if W.dim() == 1 else (
                l.T if self.settings.get("fan_in_fan_out") else l)
            ref = W * l if sign > 0 else W / l
            return ref, ref.abs()
        if self.kind == "oft":
            w64 = self.parts["oft_R.weight"].double()
            R = rotations.oft_matrix(w64, self.settings, W.shape[1], inverse=sign < 0)
            R_abs = rotations.oft_matrix(w64, self.settings, W.shape[1], abs_=True)
            ref = W @ R.T
            return ref, W.abs() @ torch.maximum(R_abs, R.abs()).T
        M = rotations.boft_matrix(self.parts["boft_R"].double(), inverse=sign < 0)
        s = self.parts["boft_s"].double()
        if sign > 0:
            ref = (W @ M.T) * s
            return ref, (W.abs() @ M.abs().T) * s.abs()
        ref = (W / s) @ M.T
        return ref, (W / s).abs() @ M.abs().T

