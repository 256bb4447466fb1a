"""The one in-memory adapter model that every format is read into and written from.

``LoraModule`` holds one module's factors (A [r, in], B [out, r]; conv: A [r, in, kh, kw],
B [out, r, 1, 1]; embedding: A [r, vocab], B [dim, r]), its alpha, rsLoRA flag, layout, and the
optional DoRA magnitude and lora bias. ``scale`` and ``delta`` are defined here once.

Example (``formats.read_adapter`` reads any format into it)::
    ad = read_adapter("my-adapter/")
    for m in ad.modules.values():
        print(m.name, m.rank, m.scale, m.delta().shape)
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Mapping, Protocol

import torch

from ..errors import FormatError
from ..headers import moe
from ..headers.adapters import lora_scale
from ..headers.moe import on_disk
from ..headers.paths import entries
from ..model.lyco import LycoModule
from ..model.tuners import TunerModule
from ..numerics import ops

if TYPE_CHECKING:
    from ..headers.safetensors import TensorInfo


@dataclass
class LoraModule:
    """One adapted module. ``name`` is the module path in the base model (no ``.weight``);
    ``component`` names the sub-model of a pipeline (``unet``, ``text_encoder`` …) or is None."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rslora: bool = False
    layout: str = "linear"
    magnitude: torch.Tensor | None = None  # DoRA: per output row
    bias: torch.Tensor | None = None  # lora_B.bias: b' = b + scale·bias
    component: str | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[1] if self.experts else self.A.shape[0])

    @property
    def experts(self) -> int:
        """The number of experts of a fused mixture-of-experts parameter, else 0."""
        return int(self.A.shape[0]) if self.layout in ("experts", "experts_t") else 0

    @property
    def is_experts(self) -> bool:
        return bool(self.experts)

    @property
    def has_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def scale(self) -> float:
        """The factor in front of B@A."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def key(self) -> str:
        """Unique within an adapter: ``component.name`` or ``name``."""
        return f"{self.component}.{self.name}" if self.component else self.name

    @property
    def base_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module changes."""
        return ops.base_shape(tuple(self.A.shape), tuple(self.B.shape), self.layout)

    @property
    def kernel(self) -> list[int] | None:
        return list(self.A.shape[2:]) if self.layout == "conv" else None

    def factors_2d(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, r], A [r, in]) as matrices whatever the layout (conv kernels flattened):
        B@A·scale is ΔW oriented [out, in]. Not for experts: see :meth:`expert`."""
        if self.experts:
            raise ValueError(f"{self.name}: experts have one pair of factors per expert")
        B = self.B.to(dtype).reshape(self.B.shape[0], self.B.shape[1])
        A = self.A.to(dtype).reshape(self.A.shape[0], -1)
        return B, A

    def expert(self, e: int) -> LoraModule:
        """Expert ``e`` of a fused parameter as a linear module of the same rank and scale:
        ΔW_e [out, in] (its transpose for experts_t)."""
        return LoraModule(f"{self.name}[{e}]", self.A[e], self.B[e], self.alpha, self.rslora,
                          "linear" if self.layout == "experts" else "fan_in_fan_out",
                          component=self.component)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
              ) -> torch.Tensor:
        """Dense ΔW = scale·B@A in the base weight's layout (no DoRA normalisation)."""
        return ops.lora_delta(self.A.to(device=device, dtype=dtype),
                              self.B.to(device=device, dtype=dtype), self.scale, self.layout)

    def abs_delta(self) -> torch.Tensor:
        """|s|·(|B|@|A|) in float64: a bound on |ΔW| for rounding-error bounds."""
        return ops.lora_abs_delta(self.A.double(), self.B.double(), self.scale, self.layout)


# a module that is not LoRA: LyCORIS' (LoHa, LoKr, full; PEFT's LoHa and LoKr too) or one of
# PEFT's other tuners (AdaLoRA, VeRA, IA³, OFT, BOFT)
OtherModule = LycoModule | TunerModule
# a module of an adapter: LoRA factors, or another kind's tensors
AdapterModule = LoraModule | OtherModule


class BaseTensors(Protocol):
    """What fitting an adapter to its base reads of the base: its tensors by name, and what
    messages call it (a Checkpoint, or the view of one that ``engine.plan`` makes)."""

    @property
    def tensors(self) -> Mapping[str, TensorInfo]: ...

    @property
    def source(self) -> str: ...

    @property
    def path(self) -> Path: ...


@dataclass
class LoraAdapter:
    """A whole adapter: LoRA modules, full tensors (``modules_to_save``) and provenance."""

    modules: dict[str, LoraModule] = field(default_factory=dict)  # by LoraModule.key
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> tensor
    base_model: str | None = None
    base_revision: str | None = None
    source_format: str = ""
    task_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # header metadata to keep (kohya ss_*)
    peft_config: dict[str, object] | None = None  # the original PEFT config, when read from one
    source_modules: set[str] | None = None  # module names as read, to know if they changed
    # the base ties its output head to the input embeddings: a loader must tie what the
    # adapter changes in one to the other (PEFT's ensure_weight_tying)
    tie_embeddings: bool = False
    # kohya names that could not be mapped to module paths (no record, no --base): only a
    # kohya writer can use them as they are
    unresolved: list[str] = field(default_factory=list)
    # "gguf": modules named as llama.cpp names tensors (blk.0.attn_q), read from a GGUF
    # adapter without a transformers base to name them back
    naming: str = "hf"
    # modules that are not LoRA, by key: LyCORIS LoHa, LoKr and full modules (lyco.LycoModule,
    # PEFT's LoHa and LoKr too) and PEFT's other tuners (tuners.TunerModule)
    lyco: dict[str, OtherModule] = field(default_factory=dict)

    def add(self, m: AdapterModule) -> None:
        """Add a module (a LoraModule after checking its factors agree, or another kind)."""

        if m.key in self.modules or m.key in self.lyco:
            raise FormatError(f"module {m.key} appears twice in the adapter")
        if isinstance(m, (LycoModule, TunerModule)):
            self.lyco[m.key] = m
            return
        check_module(m)
        self.modules[m.key] = m

    @property
    def components(self) -> list[str | None]:
        mods = list(self.modules.values()) + list(self.lyco.values())
        return sorted({m.component for m in mods}, key=lambda c: c or "")

    def common(self) -> tuple[int, float]:
        """The most common (rank, alpha): what a config states once, patterns override. LoRA
        modules and LyCORIS ones alike (a LyCORIS module without alpha has alpha = rank)."""
        mods: list[AdapterModule] = [*self.modules.values(), *self.lyco.values()]
        ranks = Counter(m.rank for m in mods)
        alphas = Counter(float(m.alpha) if m.alpha else float(m.rank) for m in mods)
        return (ranks.most_common(1)[0][0] if ranks else 8,
                alphas.most_common(1)[0][0] if alphas else 8.0)

    def num_bytes(self) -> int:
        """Bytes of every tensor the adapter holds, each at its own dtype."""
        ts = [t for m in self.modules.values() for t in (m.A, m.B, m.bias, m.magnitude)
              if t is not None] + list(self.full.values())
        ts += [t for m in self.lyco.values() for t in (*m.parts.values(), m.magnitude)
               if t is not None]
        once = {id(t): t for t in ts}  # VeRA's projections are shared by every module
        return sum(t.numel() * t.element_size() for t in once.values())

    def num_params(self) -> int:
        n = sum(m.A.numel() + m.B.numel() + (m.bias.numel() if m.bias is not None else 0)
                + (m.magnitude.numel() if m.magnitude is not None else 0)
                for m in self.modules.values())
        n += sum(t.numel() for t in self.full.values())
        return n + sum(m.num_params() for m in self.lyco.values())


def check_module(m: LoraModule) -> None:
    """Factor shapes agree, alpha is a finite number, no NaN/Inf: else a clear error."""
    where = f"module {m.key}"
    if m.layout not in ops.LAYOUTS:
        raise FormatError(f"{where}: unknown layout {m.layout!r}")
    if m.A.dim() < 2 or m.B.dim() < 2:
        raise FormatError(f"{where}: factors must be at least 2-D, got A {list(m.A.shape)} "
                          f"and B {list(m.B.shape)}")
    if m.experts:
        if m.A.dim() != 3 or m.B.dim() != 3 or m.A.shape[0] != m.B.shape[0] or \
                m.A.shape[1] != m.B.shape[2]:
            raise FormatError(f"{where}: expert factors must be A [E, r, in] and B [E, out, r], "
                              f"got A {list(m.A.shape)} and B {list(m.B.shape)}")
        if m.magnitude is not None or m.bias is not None:
            raise FormatError(f"{where}: DoRA and lora bias are not defined for experts")
    elif m.A.shape[0] != m.B.shape[1]:
        raise FormatError(f"{where}: rank of A ({m.A.shape[0]}, shape {list(m.A.shape)}) differs "
                          f"from rank of B ({m.B.shape[1]}, shape {list(m.B.shape)})")
    if isinstance(m.alpha, bool) or not isinstance(m.alpha, (int, float)) or not math.isfinite(
            m.alpha):
        raise FormatError(f"{where}: alpha {m.alpha!r} is not a finite number")
    for label, t in (("A", m.A), ("B", m.B), ("magnitude", m.magnitude), ("bias", m.bias)):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{where}: {label} holds NaN or Inf values; the adapter is damaged "
                              "(retrain or re-export it)")
    if m.experts:
        return
    out = m.base_shape[1] if m.layout in ("fan_in_fan_out", "embedding") else m.base_shape[0]
    for label, t in (("magnitude", m.magnitude), ("bias", m.bias)):
        if t is not None and t.numel() != out:
            raise FormatError(f"{where}: {label} has {t.numel()} values for {out} outputs")


HEAD = "lm_head"  # the name transformers gives a tied output head (GPT-2, Llama, BLOOM …)


def add_head_mirror(ad: LoraAdapter, embedding: str) -> None:
    """For a base whose head is tied to its embeddings: give the head the embedding's change
    too, as PEFT needs it (with ensure_weight_tying it expects ``lm_head`` entries; without,
    for names it does not tie such as GPT-2's ``wte``, the head would keep its old weights).
    A full embedding is copied; an embedding LoRA becomes the head's linear LoRA with the
    factors swapped and transposed (ΔW_head = ΔE = s·(B@A)ᵀ = s·Aᵀ@Bᵀ)."""
    if embedding in ad.full:
        ad.full[HEAD + ".weight"] = ad.full[embedding]
    m = ad.modules.get(embedding[: -len(".weight")])
    if m is not None and m.layout == "embedding":
        ad.add(LoraModule(HEAD, m.B.T.contiguous(), m.A.T.contiguous(), m.alpha, m.rslora,
                          "linear", component=m.component))


def drop_head_mirror(ad: LoraAdapter, embedding: str) -> None:
    """Undo :func:`add_head_mirror` for a merge into a tied base, where tying alone gives the
    head the embedding's change; a head change that is not an exact mirror stays (and then
    needs --untie)."""

    name = HEAD + ".weight"
    if name in ad.full and embedding in ad.full and torch.equal(ad.full[name],
                                                                ad.full[embedding]):
        del ad.full[name]
    h, e = ad.modules.get(HEAD), ad.modules.get(embedding[: -len(".weight")])
    # the head's layout label may say fan_in_fan_out (a PEFT config's global flag for GPT-2):
    # its factors decide, as PEFT itself decides by module type
    if h is not None and e is not None and e.layout == "embedding" and h.layout in (
            "linear", "fan_in_fan_out") and h.scale == e.scale and h.A.shape == e.B.T.shape \
            and h.B.shape == e.A.T.shape and torch.equal(h.A, e.B.T) \
            and torch.equal(h.B, e.A.T):
        del ad.modules[HEAD]


def _base_candidates(name: str) -> list[str]:
    """Tensor names a module may have in a base checkpoint: as is, then with the wrapper
    prefixes transformers adds or drops between versions and model classes."""

    out: list[str] = []
    for variant in on_disk(name):  # Mixtral's block_sparse_moe, named mlp in memory
        parts = variant.split(".")
        out += [variant + ".weight"]
        out += [".".join(parts[i:]) + ".weight" for i in range(1, len(parts))]
        out += [p + variant + ".weight" for p in ("model.", "transformer.",
                                                  "model.language_model.")]
    return out


def base_tensor_name(name: str, names: Collection[str]) -> str | None:
    """The base tensor a full tensor of the adapter replaces: its name, or the name the
    checkpoint stores it under (``mlp.gate.weight`` is Mixtral's ``block_sparse_moe.gate``)."""

    return next((n for n in on_disk(name) if n in names), None)


def match_base(ad: LoraAdapter, base: BaseTensors) -> dict[str, str]:
    """Map each module to its base tensor (``module key → tensor name``) and check shapes.

    A linear module whose base weight is stored transposed (GPT-2's Conv1D) becomes
    fan_in_fan_out: the base's shape is trusted over old configs. The first module that does
    not fit is a clear error naming it and both shapes.
    """
    names = base.tensors
    where = base.source or base.path
    out: dict[str, str] = {}
    for key, m in ad.modules.items():
        if m.experts:
            found = _fused_tensor(m, names, where)
            if found is not None:
                out[key] = found
            continue
        found = next((c for c in _base_candidates(m.name) if c in names), None)
        if found is None:
            tail = "." + m.name + ".weight"
            hits = [n for n in names if n.endswith(tail)]
            found = hits[0] if len(hits) == 1 else None
        if found is None:
            raise FormatError(f"module {key}: the base {where} has no tensor {m.name}.weight; is "
                              "it the model this adapter was trained for?")
        have, want = tuple(names[found].shape), m.base_shape
        if have != want and len(want) == 2 and have == want[::-1] and m.layout in (
                "linear", "fan_in_fan_out"):
            m.layout = "fan_in_fan_out" if m.layout == "linear" else "linear"
        elif have != want:
            raise FormatError(f"module {key}: the adapter needs a base weight of shape "
                              f"{list(want)} but {found} in {where} is {list(have)}")
        out[key] = found
    for key, lm in ad.lyco.items():
        out[key] = lyco_tensor(lm, names, where)
    for name, t in ad.full.items():
        if base_tensor_name(name, names) is None:
            raise FormatError(f"full tensor {name} (modules_to_save) is not in the base {where}")
    return out


def lyco_tensor(m: OtherModule, names: Mapping[str, TensorInfo], where: str | Path) -> str:
    """The base tensor a module that is not LoRA changes; a conv stored flat (LyCORIS) takes
    the base's shape, as do the tuners whose tensors tell only one side of it (IA³, VeRA)."""

    found = next((c for c in _base_candidates(m.name) if c in names), None)
    if found is None:
        raise FormatError(f"module {m.key}: the base {where} has no tensor {m.name}.weight; is "
                          "it the model this adapter was trained for?")
    have = tuple(names[found].shape)
    if not m.fit_base(have):
        raise FormatError(f"module {m.key}: the {m.kind} module does not fit {found} in "
                          f"{where}, of shape {list(have)}" + (
                              f" (its ΔW has shape {list(m.shape)})" if m.shape else ""))
    if m.bias is not None:
        bname = found[: -len(".weight")] + ".bias"
        if bname not in names or tuple(names[bname].shape) != tuple(m.bias.shape):
            raise FormatError(f"module {m.key}: diff_b changes a bias the base {where} does "
                              f"not have as {list(m.bias.shape)} ({bname})")
    return found


def _fused_tensor(m: LoraModule, names: Mapping[str, TensorInfo], where: str | Path
                  ) -> str | None:
    """The base tensor of a fused expert parameter, orienting the module by it; None when the
    base holds the experts one tensor each (see :func:`expert_parts`)."""

    # transformers' fused parameters have no ``.weight``; llama.cpp's ffn_*_exps have
    cands = [c for w in _base_candidates(m.name) for c in (w[: -len(".weight")], w)]
    found = next((c for c in cands if c in names), None)
    if found is None:
        if moe.sources(m.name, _natural(m), names) is None:
            raise FormatError(f"module {m.key}: the base {where} has neither a tensor {m.name} "
                              "nor one tensor per expert for it; is it the model this adapter "
                              "was trained for?")
        return None
    have = tuple(names[found].shape)
    E, n_in, n_out = m.experts, m.A.shape[2], m.B.shape[1]
    if have == (E, n_out, n_in):
        m.layout = "experts"
    elif have == (E, n_in, n_out):
        m.layout = "experts_t"
    else:
        raise FormatError(f"module {m.key}: the adapter needs a base parameter of shape "
                          f"{[E, n_out, n_in]} but {found} in {where} is {list(have)}")
    return found


def _natural(m: LoraModule) -> tuple[int, int, int]:
    """[E, out, in] of an experts module, whatever its layout."""
    return (m.experts, int(m.B.shape[1]), int(m.A.shape[2]))


def expert_parts(ad: LoraAdapter, base: BaseTensors) -> dict[str, list[moe.Part]]:
    """For each experts module whose base holds one 2-D tensor per expert: the tensors and
    rows it changes (``moe.Part``), its layout set to ``experts`` ([E, out, in])."""

    out = {}
    for key, m in ad.modules.items():
        if m.experts and not any(c[: -len(".weight")] in base.tensors or c in base.tensors
                                 for c in _base_candidates(m.name)):
            parts = moe.sources(m.name, _natural(m), base.tensors)
            if parts is not None:
                m.layout = "experts"
                out[key] = parts
    return out


# --------------------------------------------------------------------------- pipelines

def pipeline_folders(root: Path) -> set[str]:
    """The subfolders of a pipeline folder (its components and others), each checked to lie
    inside it: a component linked to a folder elsewhere is refused, never read."""

    return {name for name, _, is_dir in entries(root) if is_dir}


def component_folder(component: str | None, folders: set[str], spec: str) -> str:
    """The pipeline subfolder a component of an adapter changes: its own name, and kohya's
    ``lora_unet_`` (component ``unet``) is the ``transformer`` of a pipeline without a UNet."""
    if component is None:
        raise FormatError(f"{spec}: its modules name no pipeline component (unet, "
                          "text_encoder …); merge it into the component's folder instead")
    if component in folders:
        return component
    if component == "unet" and "transformer" in folders:
        return "transformer"
    raise FormatError(f"{spec}: changes the component {component}, which the pipeline has no "
                      f"folder for (it has {', '.join(sorted(folders))})")


def only_component(ad: LoraAdapter, component: str | None) -> LoraAdapter:
    """The part of an adapter for one component, named as that component's model names it."""

    part = copy.copy(ad)
    part.modules = {}
    part.lyco = {}
    for m in (*ad.modules.values(), *ad.lyco.values()):
        if m.component == component:
            m = copy.copy(m)
            m.component = None
            part.add(m)
    part.full = dict(ad.full) if component is None else {}
    return part
