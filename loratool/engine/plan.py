"""What merging adapters into a base does to each tensor, planned before any tensor is read:
the plan that ``merge``, ``unmerge`` and ``export`` share (``kernel`` applies it).

:func:`plan_edits` maps every adapter module and full tensor onto the base tensor it changes
(checking shapes, tied heads, DoRA, conflicts between adapters) and returns an :class:`Edit`
per changed tensor, and the output's tensor list.

Example::
    edits, order = plan_edits(base, adapters, [1.0], ["adapter/"])
    edits["model.layers.0.self_attn.q_proj.weight"].lora      # [(LoraModule, 1.0)]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import FormatError
from ..headers.changes import EMBEDDING, HEAD_TENSOR, input_embedding, ties_embeddings
from ..model.adapter import (
    LoraModule,
    base_tensor_name,
    drop_head_mirror,
    expert_parts,
    match_base,
)
from ..model.lyco import LycoModule
from ..model.tuners import TunerModule
from ..numerics.nf4 import FourBit

if TYPE_CHECKING:
    import torch

    from ..headers.checkpoint import Checkpoint
    from ..model.adapter import AdapterModule, BaseTensors, LoraAdapter


@dataclass
class Edit:
    """What happens to one output tensor."""

    source: str  # base tensor it starts from
    # (module, weight): LoRA, or a LyCORIS module's dense ΔW
    lora: list[tuple[AdapterModule, float]] = field(default_factory=list)
    # modules whose bias adds here
    bias: list[tuple[AdapterModule, float]] = field(default_factory=list)
    full: tuple[torch.Tensor, float] | None = None  # (replacement tensor, weight), applied first
    owner: str | None = None  # the adapter that replaces this tensor
    dora: tuple[AdapterModule, float] | None = None  # the one DoRA module on this tensor
    # the one multiplicative module (IA³, OFT, BOFT): W·diag(l), R·W …, not W + ΔW; on a bias
    # (1-D), IA³'s scaling of it
    mult: TunerModule | None = None
    # --qlora: the base is bitsandbytes' dequantize(quantize(W)) (transposed: a Conv1D)
    quant: tuple[FourBit, bool] | None = None


def _single_model(ad: LoraAdapter, spec: str) -> None:
    comps = ad.components
    if len(comps) > 1:
        raise FormatError(f"{spec}: the adapter spans components {comps}; merge one model at a "
                          "time (convert it per component)")
    for m in (*ad.modules.values(), *ad.lyco.values()):
        m.component = None


def _check_replacement(name: str, new: tuple[int, ...], old: tuple[int, ...], spec: str
                       ) -> None:
    """A full tensor replaces a base tensor of its shape; only a lookup table or head may
    differ, in its first dimension (a resized vocabulary): anything else would write a model
    its own library refuses."""

    if new == old:
        return
    resized = len(new) == len(old) == 2 and new[1:] == old[1:] and (
        EMBEDDING.search(name) or HEAD_TENSOR.search(name))
    if not resized:
        raise FormatError(f"{spec}: full tensor {name} is {list(new)} but the base's is "
                          f"{list(old)}; only an embedding or head may change size (its "
                          "vocabulary): is the adapter for this base?")


def changes_nothing(m: AdapterModule) -> bool:
    """A module whose ΔW is exactly zero (LoRA: rank 0, or an all-zero factor, as PEFT's
    initial lora_B; LyCORIS: a factor of zeros, as it initialises one side): adding it changes
    no weight, so no tensor counts as changed by it. A DoRA magnitude still rescales, so DoRA
    modules always count."""
    if m.magnitude is not None:
        return False
    if isinstance(m, (LycoModule, TunerModule)):
        return m.is_zero()
    return m.rank == 0 or m.A.numel() == 0 or m.B.numel() == 0 or not bool(
        m.A.any()) or not bool(m.B.any())


def plan_edits(base: Checkpoint, adapters: list[LoraAdapter], weights: list[float],
               specs: list[str], untie: bool = False, inert: list[str] | None = None,
               quantized: dict[str, tuple[FourBit, bool]] | None = None
               ) -> tuple[dict[str, Edit], list[tuple[str, str]]]:
    """Which output tensors change and how, and the output tensor list ``(name, source)``;
    modules that change nothing go to ``inert``; ``quantized``: :func:`_quantized_bases`."""
    edits: dict[str, Edit] = {}
    tied = ties_embeddings(base.config, base.tensors)
    emb = input_embedding(base.tensors)
    order = [(n, n) for n in base.tensors]
    extra: list[tuple[str, str]] = []
    adapters = list(adapters)
    for i, (ad, w, spec) in enumerate(zip(adapters, weights, specs)):
        _single_model(ad, spec)
        if tied and emb is not None:
            ad = adapters[i] = copy.copy(ad)  # the caller's adapter stays as it was read
            ad.modules, ad.full = dict(ad.modules), dict(ad.full)
            drop_head_mirror(ad, emb)  # tying gives the head the embedding's change
        heads = [m.name + ".weight" for m in ad.modules.values() if m.name.endswith("lm_head")]
        heads += [n for n in ad.full if n.endswith("lm_head.weight")]
        heads = [n for n in heads if n not in base.tensors]
        if heads and tied:
            if not untie:
                raise FormatError(f"{spec}: changes {heads[0][: -len('.weight')]}, which this "
                                  "base ties to its input embeddings (tie_word_embeddings): "
                                  "merging would change the embeddings too. Pass --untie to "
                                  "write a separate lm_head")
            if emb is None:
                raise FormatError(f"{spec}: cannot find the tied input embedding to untie from")
            for name in heads:
                if name not in [e[0] for e in extra]:
                    extra.append((name, emb))
        names = dict(base.tensors)
        for out_name, src in extra:
            names[out_name] = base.tensors[src]

        class View:  # the base as the adapter sees it, untied lm_head included
            tensors = names
            source = base.source
            path = base.path

        mapping = match_base(ad, View)
        _per_expert(ad, View, edits, spec, w)
        for full_name, t in ad.full.items():
            name = base_tensor_name(full_name, names) or full_name  # checked by match_base
            _check_replacement(name, tuple(t.shape), names[name].shape, spec)
            e = edits.setdefault(name, Edit(dict(extra).get(name, name)))
            if e.full is not None or e.lora or e.dora or e.mult:
                raise FormatError(f"{spec}: full tensor {name} (modules_to_save) would replace "
                                  "a tensor another adapter also changes")
            e.full, e.owner = (t, w), spec
        for key, tname in _changing(ad, mapping, inert):
            m = ad.modules[key] if key in ad.modules else ad.lyco[key]
            e = edits.setdefault(tname, Edit(dict(extra).get(tname, tname)))
            _place(m, w, e, tname, base, edits, spec, key)
    _quantized_bases(edits, quantized or {})
    return edits, order + extra


def _place(m: AdapterModule, w: float, e: Edit, tname: str, base: Checkpoint,
           edits: dict[str, Edit], spec: str, key: str) -> None:
    """One module's change to the edit of its tensor (and of its bias), or the one line that
    says why it cannot share that tensor."""
    if e.full is not None and e.owner != spec:
        raise FormatError(f"{spec}: {key} changes {tname}, which another adapter replaces "
                          "in full (modules_to_save)")
    if e.mult is not None:
        raise FormatError(_alone(spec, key, e.mult))
    if isinstance(m, TunerModule) and m.multiplicative:
        if e.lora or e.dora or e.full:
            raise FormatError(_alone(spec, key, m))
        _multiply(m, w, e, tname, base, edits, spec, key)
        return
    if m.magnitude is not None:
        if e.lora or e.dora or e.full:
            raise FormatError(f"{spec}: {key} has DoRA and another adapter changes the "
                              "same weight; a DoRA magnitude does not add: merge it "
                              "alone")
        if m.layout == "embedding":
            raise FormatError(f"{spec}: DoRA on embedding {key} is not supported")
        e.dora = (m, w)
    else:
        if e.dora is not None:
            raise FormatError(f"{spec}: {key} changes a weight that a DoRA adapter "
                              "also changes; merge the DoRA adapter alone")
        e.lora.append((m, w))
    if m.bias is not None:  # a lora bias, or a LyCORIS full module's diff_b
        bname = tname[: -len(".weight")] + ".bias"
        if bname not in base.tensors:
            raise FormatError(f"{spec}: {key} has a lora bias but the base has no "
                              f"{bname}")
        b = edits.setdefault(bname, Edit(bname))
        if b.mult is not None:
            raise FormatError(_alone(spec, key, b.mult))
        b.bias.append((m, w))


def _alone(spec: str, key: str, m: TunerModule) -> str:
    return (f"{spec}: {key} and another module change the same weight, and {m.kind} "
            f"({m.key}) multiplies it: the order would matter; merge that adapter alone")


def _multiply(m: TunerModule, w: float, e: Edit, tname: str, base: Checkpoint,
              edits: dict[str, Edit], spec: str, key: str) -> None:
    """A multiplicative module's edit, and IA³'s on the bias it scales (PEFT's merge scales
    the bias of an output-side vector too)."""
    if w != 1.0:
        raise FormatError(f"{spec}: {key} multiplies the weight ({m.kind}); a --weight other "
                          "than 1 has no meaning for it: convert it to LoRA first "
                          "(`loratool convert ADAPTER --to peft --max-error 0.01 --base BASE "
                          "-o OUT`)")
    e.mult = m
    bname = tname[: -len(".weight")] + ".bias"
    if m.scales_bias and bname in base.tensors:
        b = edits.setdefault(bname, Edit(bname))
        if b.bias or b.mult or b.full:
            raise FormatError(_alone(spec, key, m))
        if tuple(base.tensors[bname].shape) != (m.parts["ia3_l"].numel(),):
            raise FormatError(f"{spec}: {key}: the base's {bname} has shape "
                              f"{list(base.tensors[bname].shape)}, which IA³'s "
                              f"{m.parts['ia3_l'].numel()} values do not scale")
        b.mult = m


def _quantized_bases(edits: dict[str, Edit], quantized: dict[str, tuple[FourBit, bool]]
                     ) -> None:
    """--qlora: every tensor bitsandbytes quantized for training gets an edit whose base is
    dequantize(quantize(W)), changed by an adapter or not (the trained model computed with all
    of them quantized); a tensor an adapter replaces in full keeps the replacement."""
    for name, q in quantized.items():
        e = edits.setdefault(name, Edit(name))
        if e.full is None:
            e.quant = q


def _changing(ad: LoraAdapter, mapping: dict[str, str], inert: list[str] | None
              ) -> list[tuple[str, str]]:
    """The (module key, tensor) pairs that change something; the others' keys go to
    ``inert``."""
    out = []
    for key, tname in mapping.items():
        m = ad.modules[key] if key in ad.modules else ad.lyco[key]
        if m.bias is None and changes_nothing(m):
            if inert is not None:
                inert.append(key)
        else:
            out.append((key, tname))
    return out


def _per_expert(ad: LoraAdapter, base: BaseTensors, edits: dict[str, Edit], spec: str, w: float
                ) -> None:
    """Experts held one tensor each by the base: each tensor's rows of its expert's ΔW, as a
    linear module of the same rank and scale (B's rows sliced: the same products)."""

    for key, parts in expert_parts(ad, base).items():
        m = ad.modules[key]
        for p in parts:
            e = edits.setdefault(p.tensor, Edit(p.tensor))
            if e.full is not None or e.dora is not None:
                raise FormatError(f"{spec}: {key} changes {p.tensor}, which another adapter "
                                  "replaces or changes with DoRA")
            e.lora.append((LoraModule(p.tensor[: -len(".weight")], m.A[p.expert],
                                      m.B[p.expert, p.start:p.stop], m.alpha, m.rslora,
                                      "linear"), w))
