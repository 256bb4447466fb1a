"""PEFT's adapter_config.json and model card written from what an adapter's modules say of
themselves (name, rank, alpha, layout, DoRA, bias), with no tensor: the format writer and the
byte-level ``combine --method cat`` write the same files from it. Never imports torch.

Example::
    cfg, order = peft_config(modules, AdapterMeta("CAUSAL_LM", "org/base", None, False), [])
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Collection, Protocol, Sequence, TypeVar

import yaml

from ..errors import FormatError
from ..units import natural_key
from .sources import hub_repo_of


class ModuleFacts(Protocol):
    """What the config needs of one LoRA module (``model.adapter.LoraModule`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def scale(self) -> float: ...
    @property
    def rslora(self) -> bool: ...
    @property
    def layout(self) -> str: ...
    @property
    def is_experts(self) -> bool: ...
    @property
    def has_dora(self) -> bool: ...
    @property
    def has_bias(self) -> bool: ...


M = TypeVar("M", bound=ModuleFacts)


@dataclass
class AdapterMeta:
    """What the config says of the adapter as a whole; ``peft_config`` and
    ``source_modules``: the config it was read with and its modules then (the original targets
    are kept while those are unchanged)."""

    task_type: str | None
    base_model: str | None
    base_revision: str | None
    tie_embeddings: bool
    peft_config: dict[str, object] | None = None
    source_modules: set[str] | None = None


def peft_config(mods: Sequence[M], ad: AdapterMeta, full: Collection[str]
                ) -> tuple[dict[str, object], list[M]]:
    r"""The adapter_config for ``mods`` (one model's modules; ``full``: the names of the full
    tensors written beside them): minimal, complete, exact. Also the modules in the order
    their tensors are written.

    rank_pattern/alpha_pattern carry per-module values; keys are escaped full module names, so
    PEFT's rule ``(.*\.)?(k)$`` matches exactly one module.
    """
    rslora = all(m.rslora for m in mods)
    # a mix of rsLoRA and plain modules: restate alphas so that every scale is kept
    alphas = {m.name: (m.alpha if m.rslora == rslora else
                       (m.scale * (math.sqrt(m.rank) if rslora else m.rank))) for m in mods}
    ranks = {m.name: m.rank for m in mods}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    dora = [m.has_dora for m in mods]
    if any(dora) and not all(dora):
        raise FormatError("some modules have a DoRA magnitude and others do not; PEFT applies "
                          "DoRA to all modules of an adapter or none")
    names = {m.name for m in mods}
    orig = ad.peft_config or {}
    params = sorted((m.name for m in mods if m.is_experts), key=natural_key)
    target: object = sorted(names - set(params), key=natural_key) or None
    if ad.source_modules == names:
        # unchanged since read: keep the original (often shorter, suffix-style) targets
        target = orig.get("target_modules") or target
        params = orig.get("target_parameters") or params
    if any(m.has_bias for m in mods) and any(m.layout == "embedding" for m in mods):
        raise FormatError("PEFT cannot load lora_B biases in an adapter that also has embedding "
                          "LoRA (its lora_bias flag covers every module and refuses embeddings); "
                          "write the biases as full tensors (extract does this itself), or "
                          "choose --format kohya/diffusers without the embeddings")
    # a full tensor of a module that has LoRA is saved as its base layer (base_layer.bias, as
    # PEFT's bias="lora_only" saves it); other full tensors are modules_to_save
    full_modules = sorted({n.rsplit(".", 1)[0] for n in full} - names, key=natural_key)
    base_layer_full = any(n.rsplit(".", 1)[0] in names for n in full)
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
        "lora_bias": any(m.has_bias for m in mods),
        "fan_in_fan_out": any(m.layout == "fan_in_fan_out" for m in mods),
        "modules_to_save": full_modules or None,
        "bias": "lora_only" if base_layer_full else "none",
        "ensure_weight_tying": True if ad.tie_embeddings else None,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return cfg, sorted(mods, key=lambda m: natural_key(m.name))


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


def model_card(ad: AdapterMeta, cfg: dict[str, object], note: str, *, modules: int,
               ranks: list[int], full: int, params: int) -> str:
    """A README.md with the Hub's metadata: base_model (only a Hub id, never a local path),
    library_name: peft, tags; the loading snippet uses the class that fits the task."""

    hub = hub_repo_of(ad.base_model)
    meta: dict[str, object] = {}
    if hub:
        meta.update(base_model=hub[0], base_model_relation="adapter")
    meta.update(library_name="peft", tags=["lora", "loratool"])
    title = f"LoRA adapter for {hub[0]}" if hub else "LoRA adapter"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {title}", "", note, "",
             f"- LoRA modules: {modules}; ranks: {', '.join(map(str, ranks))}; "
             f"lora_alpha: {cfg['lora_alpha']:g}" + ("; rsLoRA" if cfg["use_rslora"] else "")
             + ("; DoRA" if cfg["use_dora"] else ""),
             f"- full tensors (modules_to_save): {full}",
             f"- parameters: {params:,}", ""]
    cls = AUTO_CLASS.get(ad.task_type or "", "AutoModel")
    base = json.dumps(hub[0] if hub else "PATH_OR_HUB_ID_OF_THE_BASE_MODEL")
    lines += ["```python", "from peft import PeftModel", f"from transformers import {cls}", "",
              f"base = {cls}.from_pretrained({base}"
              + (f", revision={json.dumps(hub[1])})" if hub and hub[1] else ")"),
              'model = PeftModel.from_pretrained(base, "PATH_OR_HUB_ID_OF_THIS_ADAPTER")',
              "```", ""]
    return "\n".join(lines)


def written_config(cfg: dict[str, object]) -> dict[str, object]:
    """The config as written: unset fields left out, except the two PEFT always writes."""
    return {k: v for k, v in cfg.items() if v is not None or k in ("task_type",
                                                                    "base_model_name_or_path")}
