"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(embeddings: ``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r], no ``.weight``).
Scale is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern``
and ``alpha_pattern`` override per module with PEFT's matching rule (:func:`pattern_value`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import FormatError
from ..formats.base import Format, held
from ..formats.peft_params import experts_module, parameter_modules
from ..formats.peft_tuners import read_tuner
from ..headers import moe
from ..headers.adapters import (
    PEFT_PREFIX,
    UNKNOWN_KIND_MARKS,
    config_number,
    pattern_value,
    split_key,
)
from ..headers.checkpoint import Checkpoint
from ..headers.peft_config import AdapterMeta, peft_config, written_config
from ..headers.peft_config import model_card as card_for
from ..headers.peft_tuners import kind_of, not_read
from ..io.writer import CheckpointWriter
from ..model import experts
from ..model.adapter import LoraAdapter, LoraModule
from ..options import Options
from ..units import natural_key

if TYPE_CHECKING:
    from ..formats.peft_params import FactorParts


def modules_from_state(state: dict[str, torch.Tensor], cfg: dict[str, object], where: str,
                       component: str | None = None, prefix: str = PEFT_PREFIX
                       ) -> tuple[list[LoraModule], dict[str, torch.Tensor]]:
    """Group PEFT-style keys into LoraModules (+ full tensors), applying the config's rules.

    Shared by the PEFT and diffusers readers (diffusers keys are PEFT keys per component).
    """

    if "r" not in cfg:
        raise FormatError(f"{where}: adapter config has no 'r'; add the rank the adapter was "
                          "trained with")
    config_number(cfg, "r", where)
    default_alpha = config_number(cfg, "lora_alpha", where, 8)
    for pat in ("rank_pattern", "alpha_pattern"):
        for k, v in (cfg.get(pat) or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise FormatError(f"{where}: {pat}[{k!r}] must be a number, got {v!r}")
    rslora = bool(cfg.get("use_rslora", False))
    fan = bool(cfg.get("fan_in_fan_out", False))
    parts: dict[str, FactorParts] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        rel = key[len(prefix):] if key.startswith(prefix) else key
        sk = split_key(rel)
        if sk is None:
            if any(mark in rel for mark in UNKNOWN_KIND_MARKS):
                raise FormatError(f"{where}: unknown key pattern {key!r} in a LoRA adapter "
                                  "(another tuner's tensors? its adapter_config.json's "
                                  "peft_type says which)")
            # modules_to_save and other full tensors; PEFT saves the embedding it adapts (for a
            # resized vocabulary) as <module>.base_layer.weight: it replaces <module>.weight
            full[rel.replace(".base_layer.", ".")] = t
            continue
        mod, part, leaf = sk
        d = parts.setdefault(mod, {})
        if part in ("lora_A", "lora_embedding_A"):
            if leaf == "bias":
                raise FormatError(f"{where}: {key!r}: lora_A has no bias in LoRA")
            d["A"], d["emb"] = t, part == "lora_embedding_A"
        elif part in ("lora_B", "lora_embedding_B"):
            d["bias" if leaf == "bias" else "B"] = t
        else:
            d["magnitude"] = t
    params = parameter_modules(parts, cfg)
    modules = []
    for mod in sorted(parts, key=natural_key):
        d = parts[mod]
        if "A" not in d or "B" not in d:
            have, miss = ("lora_A", "lora_B") if "A" in d else ("lora_B", "lora_A")
            if "A" not in d and "B" not in d:
                have = "a magnitude or bias"
            raise FormatError(f"{where}: module {mod} has {have} but no {miss}; the adapter "
                              "file is incomplete")
        A, B = d["A"], d["B"]
        if mod in params:  # a fused expert parameter (target_parameters)
            modules.append(experts_module(mod, A, B, cfg, default_alpha, rslora, where,
                                          component))
            continue
        if d["emb"]:
            layout = "embedding"
        elif A.dim() > 2:
            layout = "conv"
        else:
            layout = "fan_in_fan_out" if fan else "linear"
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, mod, default_alpha, where)
        rank = pattern_value(cfg.get("rank_pattern") or {}, mod, cfg["r"], where)
        if cfg["r"] and A.shape[0] != rank:  # r = 0: diffusers' files without a config
            raise FormatError(f"{where}: module {mod} has rank {A.shape[0]} (lora_A "
                              f"{list(A.shape)}) but the config says {rank} (r / rank_pattern); "
                              "the config and the weights do not belong together")
        mag = d.get("magnitude")
        modules.append(LoraModule(mod, A, B, float(alpha), rslora, layout,
                                  mag.reshape(-1) if mag is not None else None, d.get("bias"),
                                  component))
    return modules, full


def read(ckpt: Checkpoint, base: str | None = None) -> LoraAdapter:
    """A PEFT adapter folder (or bare PEFT safetensors beside its config) → LoraAdapter."""

    where = str(ckpt.source or ckpt.path)
    if ckpt.adapter_config is None:
        raise FormatError(f"{where}: PEFT adapter weights without adapter_config.json: its "
                          "alpha is unknown; put the adapter_config.json beside the weights")
    cfg = ckpt.adapter_config
    if kind_of(cfg) is not None:  # AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT
        return read_tuner(ckpt, where)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise not_read(cfg, where)
    state = {n: ckpt.load(n) for n in ckpt.tensors}
    modules, full = modules_from_state(state, cfg, where)
    ad = LoraAdapter(full=full, base_model=cfg.get("base_model_name_or_path"),
                     base_revision=cfg.get("revision"), source_format="peft",
                     task_type=cfg.get("task_type"), peft_config=cfg,
                     source_modules={m.name for m in modules},
                     tie_embeddings=cfg.get("ensure_weight_tying") is True)
    for m in modules:
        ad.add(m)
    return ad


def peft_config_for(ad: LoraAdapter, component: str | None = None
                    ) -> tuple[dict[str, object], list[LoraModule]]:
    """The adapter_config for ``ad``'s modules (of one component): minimal, complete, exact
    (the rules are ``headers.peft_config``'s)."""
    mods = [m for m in ad.modules.values() if m.component == component]
    if not mods:
        raise FormatError("the adapter has no LoRA modules to write")
    return peft_config(mods, _described(ad), ad.full)


def _described(ad: LoraAdapter) -> AdapterMeta:
    return AdapterMeta(task_type=ad.task_type, base_model=ad.base_model,
                       base_revision=ad.base_revision, tie_embeddings=ad.tie_embeddings,
                       peft_config=ad.peft_config, source_modules=ad.source_modules)


def state_for(mods: list[LoraModule], full: dict[str, torch.Tensor], prefix: str = PEFT_PREFIX
              ) -> dict[str, torch.Tensor]:
    """PEFT keys for modules (and full tensors), in natural order."""

    out: dict[str, torch.Tensor] = {}
    wrapped = moe.peft_keys([m.name for m in mods if m.experts])
    for m in mods:
        p = prefix + m.name
        if m.experts:  # a parameter wrapper, factors of rank r·E
            A, B = experts.to_peft(m.A, m.B)
            out[prefix + wrapped[m.name] + ".lora_A.weight"] = A
            out[prefix + wrapped[m.name] + ".lora_B.weight"] = B
        elif m.layout == "embedding":
            out[p + ".lora_embedding_A"], out[p + ".lora_embedding_B"] = m.A, m.B
        else:
            out[p + ".lora_A.weight"], out[p + ".lora_B.weight"] = m.A, m.B
            if m.bias is not None:
                out[p + ".lora_B.bias"] = m.bias
        if m.magnitude is not None:
            out[p + ".lora_magnitude_vector"] = m.magnitude
    lora_names = {m.name for m in mods}
    for name in sorted(full, key=natural_key):
        mod, _, leaf = name.rpartition(".")
        # a full tensor of a module that also has LoRA is its base layer, as PEFT saves it
        key = f"{mod}.base_layer.{leaf}" if mod in lora_names else name
        out[prefix + key] = full[name]
    return out


def model_card(ad: LoraAdapter, cfg: dict[str, object], note: str) -> str:
    """A README.md with the Hub's metadata (``headers.peft_config.model_card``)."""
    return card_for(_described(ad), cfg, note, modules=len(ad.modules),
                    ranks=sorted({m.rank for m in ad.modules.values()}), full=len(ad.full),
                    params=ad.num_params())


def write(ad: LoraAdapter, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None, options: Options | None = None) -> Path:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained`` loads as it is."""

    comps = ad.components
    if len(comps) > 1:
        raise FormatError(f"the adapter spans components {', '.join(str(c) for c in comps)}; a "
                          "PEFT folder holds one model: write it --to diffusers or --to kohya")
    cfg, mods = peft_config_for(ad, comps[0] if comps else None)
    cfg = written_config(cfg)
    with CheckpointWriter(out, inputs=inputs, force=force, filename="adapter_model.safetensors",
                          max_shard_size=1 << 62, options=options) as w:
        for name, t in state_for(mods, ad.full).items():
            w.add(name, t)
        w.add_file("adapter_config.json", json.dumps(cfg, indent=2) + "\n")
        w.add_file("README.md", model_card(ad, cfg, note or "Written by loratool."))
    return out


FORMAT = Format("peft", "a folder (adapter_config.json + adapter_model.safetensors)", None,
                None, lambda ckpt: True, read, lambda ad, out, **kw: (write(ad, out, **kw), None),
                lambda ad: [], held)
