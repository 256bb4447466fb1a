"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(embeddings: ``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r], no ``.weight``).
Scale is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern``
and ``alpha_pattern`` override per module with PEFT's matching rule (:func:`pattern_value`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from ..errors import FormatError
from ..formats.base import Format, held
from ..formats.peft_params import experts_module, parameter_modules
from ..headers import moe
from ..headers.adapters import PEFT_PREFIX, config_number, pattern_value, split_key
from ..headers.checkpoint import Checkpoint
from ..headers.sources import hub_repo_of
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
            if "lora_" in rel or "hada_" in rel or "lokr_" in rel:
                raise FormatError(f"{where}: unknown key pattern {key!r} (LoHa, LoKr, AdaLoRA "
                                  "and other non-LoRA adapters are not supported)")
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
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LoRA; only LoRA "
                          "adapters are supported")
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
    r"""The adapter_config for ``ad``'s modules (of one component): minimal, complete, exact.

    rank_pattern/alpha_pattern carry per-module values; keys are escaped full module names, so
    PEFT's rule ``(.*\.)?(k)$`` matches exactly one module.
    """
    mods = [m for m in ad.modules.values() if m.component == component]
    if not mods:
        raise FormatError("the adapter has no LoRA modules to write")
    rslora = all(m.rslora for m in mods)
    # a mix of rsLoRA and plain modules: restate alphas so that every scale is kept
    alphas = {m.name: (m.alpha if m.rslora == rslora else
                       (m.scale * (math.sqrt(m.rank) if rslora else m.rank))) for m in mods}
    ranks = {m.name: m.rank for m in mods}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    dora = [m.magnitude is not None for m in mods]
    if any(dora) and not all(dora):
        raise FormatError("some modules have a DoRA magnitude and others do not; PEFT applies "
                          "DoRA to all modules of an adapter or none")
    names = {m.name for m in mods}
    orig = ad.peft_config or {}
    params = sorted((m.name for m in mods if m.experts), key=natural_key)
    target: object = sorted(names - set(params), key=natural_key) or None
    if ad.source_modules == names:
        # unchanged since read: keep the original (often shorter, suffix-style) targets
        target = orig.get("target_modules") or target
        params = orig.get("target_parameters") or params
    if any(m.bias is not None for m in mods) and any(m.layout == "embedding" for m in mods):
        raise FormatError("PEFT cannot load lora_B biases in an adapter that also has embedding "
                          "LoRA (its lora_bias flag covers every module and refuses embeddings); "
                          "write the biases as full tensors (extract does this itself), or "
                          "choose --format kohya/diffusers without the embeddings")
    # a full tensor of a module that has LoRA is saved as its base layer (base_layer.bias, as
    # PEFT's bias="lora_only" saves it); other full tensors are modules_to_save
    full_modules = sorted({n.rsplit(".", 1)[0] for n in ad.full} - names, key=natural_key)
    base_layer_full = any(n.rsplit(".", 1)[0] in names for n in ad.full)
    cfg = {
        "peft_type": "LORA",
        "task_type": ad.task_type,
        "base_model_name_or_path": ad.base_model,
        "revision": ad.base_revision,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target,
        "target_parameters": params or None,
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_rslora": rslora,
        "use_dora": all(dora),
        "lora_bias": any(m.bias is not None for m in mods),
        "fan_in_fan_out": any(m.layout == "fan_in_fan_out" for m in mods),
        "modules_to_save": full_modules or None,
        "bias": "lora_only" if base_layer_full else "none",
        "ensure_weight_tying": True if ad.tie_embeddings else None,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return cfg, sorted(mods, key=lambda m: natural_key(m.name))


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


# architecture name suffix → (PEFT task_type, the transformers class that loads the base)
TASKS = (("ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM"),
         ("LMHeadModel", "CAUSAL_LM", "AutoModelForCausalLM"),
         ("ForConditionalGeneration", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
         ("ForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification"),
         ("ForTokenClassification", "TOKEN_CLS", "AutoModelForTokenClassification"),
         ("ForQuestionAnswering", "QUESTION_ANS", "AutoModelForQuestionAnswering"),
         ("Model", "FEATURE_EXTRACTION", "AutoModel"))


AUTO_CLASS = {task: cls for _, task, cls in TASKS}


def task_type_for(architectures: object) -> str | None:
    """PEFT's task_type for a config's ``architectures`` (``BertModel`` → FEATURE_EXTRACTION)."""
    for arch in architectures if isinstance(architectures, list) else []:
        for suffix, task, _ in TASKS:
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    return None


def model_card(ad: LoraAdapter, cfg: dict[str, object], note: str) -> str:
    """A README.md with the Hub's metadata: base_model (only a Hub id, never a local path),
    library_name: peft, tags; the loading snippet uses the class that fits the task."""

    hub = hub_repo_of(ad.base_model)
    meta: dict[str, object] = {}
    if hub:
        meta.update(base_model=hub[0], base_model_relation="adapter")
    meta.update(library_name="peft", tags=["lora", "loratool"])
    title = f"LoRA adapter for {hub[0]}" if hub else "LoRA adapter"
    ranks = sorted({m.rank for m in ad.modules.values()})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {title}", "", note, "",
             f"- LoRA modules: {len(ad.modules)}; ranks: {', '.join(map(str, ranks))}; "
             f"lora_alpha: {cfg['lora_alpha']:g}" + ("; rsLoRA" if cfg["use_rslora"] else "")
             + ("; DoRA" if cfg["use_dora"] else ""),
             f"- full tensors (modules_to_save): {len(ad.full)}",
             f"- parameters: {ad.num_params():,}", ""]
    cls = AUTO_CLASS.get(ad.task_type or "", "AutoModel")
    base = json.dumps(hub[0] if hub else "PATH_OR_HUB_ID_OF_THE_BASE_MODEL")
    lines += ["```python", "from peft import PeftModel", f"from transformers import {cls}", "",
              f"base = {cls}.from_pretrained({base}"
              + (f", revision={json.dumps(hub[1])})" if hub and hub[1] else ")"),
              'model = PeftModel.from_pretrained(base, "PATH_OR_HUB_ID_OF_THIS_ADAPTER")',
              "```", ""]
    return "\n".join(lines)


def write(ad: LoraAdapter, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None, options: Options | None = None) -> Path:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained`` loads as it is."""

    comps = ad.components
    if len(comps) > 1:
        raise FormatError(f"the adapter spans components {', '.join(str(c) for c in comps)}; a "
                          "PEFT folder holds one model: write it --to diffusers or --to kohya")
    cfg, mods = peft_config_for(ad, comps[0] if comps else None)
    cfg = {k: v for k, v in cfg.items() if v is not None or k in ("task_type",
                                                                   "base_model_name_or_path")}
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
