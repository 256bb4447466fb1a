"""Mixture-of-experts weights, in the three shapes they take: their names and shapes (the
tensor side, PEFT's factor layout and one module per expert, is ``loratool.model.experts``).

transformers 5 holds each layer's experts as fused 3-D parameters: ``mlp.experts.gate_up_proj``
[E, 2I, H] (each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` [E, H, I];
gpt-oss-style models store them [E, in, out] ("transposed"). Checkpoints usually hold one 2-D
tensor per expert instead — Mixtral's ``block_sparse_moe.experts.3.w1.weight`` (gate), ``w3``
(up), ``w2`` (down); Qwen-MoE's ``mlp.experts.3.gate_proj.weight`` … — which transformers fuses
on load and splits again on save. PEFT adapts the fused parameters (``target_parameters``) with
factors of rank r·E: ``lora_A`` [r·E, in] holding expert e's rows at e·r … e·r + r − 1, and
``lora_B`` [out, r·E] holding expert e's columns at e, E + e, 2E + e, … (its einsum reads it as
[out, r, E]).

loratool's adapter model keeps one module per fused parameter, named as PEFT names it
(``model.layers.0.mlp.experts.gate_up_proj``), with per-expert factors A [E, r, in] and
B [E, out, r] (layout ``experts``, or ``experts_t`` for a transposed parameter): what llama.cpp
stores too. This module finds the checkpoint tensors that hold a fused parameter's rows,
groups a checkpoint's per-expert tensors into fused parameters, and names PEFT's parameter
wrappers, from names and shapes alone.

Example::

    parts = sources("model.layers.0.mlp.experts.gate_up_proj", (8, 512, 256), base.tensors)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ..errors import FormatError
from .safetensors import TensorInfo

LAYOUTS = ("experts", "experts_t")
# the order transformers declares them in an experts module: PEFT wraps the parameters of one
# module in this order, the first innermost (its keys carry the most ``.base_layer``)
PARAMS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
FUSED = re.compile(r"^(?P<module>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")
# one expert's 2-D tensor in a checkpoint: which fused parameter it belongs to, and where
PER_EXPERT = re.compile(r"^(?P<layer>.+)\.(?P<block>block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                        r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


# proj → (fused parameter, position among the parameter's row blocks)
PROJ = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1), "up_proj": ("gate_up_proj", 1),
        "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}


# fused parameter → the per-expert tensors of each naming, in row order
FAMILIES = {"gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
            "down_proj": (("w2",), ("down_proj",))}


# model types whose per-expert checkpoint tensors transformers 5 fuses on load (its
# conversion mapping: the Mixtral and Qwen2-MoE patterns and the types that reuse them), so
# that PEFT reaches them only as fused parameters
FUSING_TYPES = frozenset((
    "mixtral", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe",
    "flex_olmo", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
    "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open",
    "mellum", "beam", "hunyuan_v1_moe", "sarvam_mla", "exaone_moe", "cohere2_moe", "afmoe",
    "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text"))


# routers: a plain parameter in transformers 5 (not a Linear module LoRA could wrap), stored
# in full by extract
ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.gate\.weight$")
# renamings transformers 5 applies on load (and PEFT's names follow), by model type
RENAMES = {t: ((".block_sparse_moe.", ".mlp."),) for t in ("mixtral", "minimax", "minimax_m2")}


def in_memory(name: str, model_type: str | None) -> str:
    """A checkpoint name as transformers 5 names the tensor in memory (PEFT's names)."""
    for old, new in RENAMES.get(model_type or "", ()):
        name = name.replace(old, new)
    return name


def on_disk(name: str) -> list[str]:
    """Names a checkpoint may store an in-memory name under (the name itself first)."""
    out = [name]
    for renames in RENAMES.values():
        for old, new in renames:
            if new in name and name.replace(new, old) not in out:
                out.append(name.replace(new, old))
    return out


# models whose fused expert parameters are stored [E, in, out] (transformers' is_transposed)
TRANSPOSED_TYPES = ("gpt_oss", "aria", "openai_privacy_filter")


def is_experts(layout: str) -> bool:
    return layout in LAYOUTS


def param_order(names: list[str]) -> list[str]:
    """Parameters of one module in the order PEFT nests their wrappers (innermost first)."""
    return sorted(names, key=lambda p: (PARAMS.index(p) if p in PARAMS else len(PARAMS), p))


def targeted(module: str, target_parameters: list[str]) -> list[str]:
    """The parameters of ``module`` that a PEFT config's target_parameters name, in nesting
    order (PEFT matches a parameter key exactly or by a suffix after a dot)."""
    found = []
    for t in target_parameters:
        mod, _, param = t.rpartition(".")
        if mod and (module == mod or module.endswith("." + mod)) and param not in found:
            found.append(param)
    return param_order(found)


# --------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Part:
    """Rows ``start:stop`` of expert ``expert``'s matrix of a fused parameter, held by the 2-D
    checkpoint tensor ``tensor`` (all of its rows)."""

    tensor: str
    expert: int
    start: int
    stop: int


def _layer_prefixes(module: str) -> list[tuple[str, str]]:
    """(layer path, experts block name) a fused module may be stored under."""
    if not module.endswith(".mlp.experts"):
        return []
    layer = module[: -len(".mlp.experts")]
    return [(layer, "mlp"), (layer, "block_sparse_moe")]


def sources(param: str, shape: tuple[int, ...], tensors: Mapping[str, TensorInfo]
            ) -> list[Part] | None:
    """The per-expert checkpoint tensors that hold fused parameter ``param`` of ``shape``
    ([E, out, in]), row block by row block; None when the checkpoint has none of them."""
    m = FUSED.match(param)
    if m is None:
        return None
    E = shape[0]
    families = FAMILIES[m.group("param")]
    for prefix in _prefixed(m.group("module")):
        for layer, block in _layer_prefixes(prefix):
            for family in families:
                names = [[f"{layer}.{block}.experts.{e}.{p}.weight" for p in family]
                         for e in range(E)]
                if all(n in tensors for row in names for n in row):
                    return _parts(names, tensors, shape, param)
    return None


def _prefixed(module: str) -> list[str]:
    """The module path, and the variants with the wrapper prefixes checkpoints add or drop."""
    parts = module.split(".")
    out = [module] + [".".join(parts[i:]) for i in range(1, len(parts))]
    return out + [p + module for p in ("model.", "model.language_model.")]


def _parts(names: list[list[str]], tensors: Mapping[str, TensorInfo], shape: tuple[int, ...],
           param: str) -> list[Part]:
    out = []
    for e, row in enumerate(names):
        start = 0
        for n in row:
            rows, cols = tensors[n].shape
            if cols != shape[2]:
                raise FormatError(f"{param}: expert {e}'s {n} is {[rows, cols]}, the adapter "
                                  f"needs {shape[2]} inputs: is the adapter for this base?")
            out.append(Part(n, e, start, start + rows))
            start += rows
        if start != shape[1]:
            raise FormatError(f"{param}: expert {e}'s tensors hold {start} rows, the adapter "
                              f"needs {shape[1]}: is the adapter for this base?")
    return out


def group(names: list[str]) -> dict[str, list[tuple[int, str, int]]]:
    """A checkpoint's per-expert tensors grouped by the fused parameter transformers makes of
    them: ``{"model.layers.0.mlp.experts.gate_up_proj": [(expert, tensor, block), …]}``
    (block: 0 gate, 1 up)."""
    out: dict[str, list[tuple[int, str, int]]] = {}
    for n in names:
        m = PER_EXPERT.match(n)
        if m is None:
            continue
        fused, block = PROJ[m.group("proj")]
        key = f"{m.group('layer')}.mlp.experts.{fused}"
        out.setdefault(key, []).append((int(m.group("e")), n, block))
    for key, items in out.items():
        items.sort()
        experts = sorted({e for e, _, _ in items})
        blocks = 2 if key.endswith("gate_up_proj") else 1
        if experts != list(range(len(experts))) or len(items) != len(experts) * blocks:
            raise FormatError(f"{key}: the checkpoint's per-expert tensors are incomplete "
                              f"({len(items)} for {len(experts)} experts)")
    return out


def orientation(param: str, shape: tuple[int, ...], model_type: str | None,
                hidden: int | None) -> str:
    """``experts`` ([E, out, in]) or ``experts_t`` ([E, in, out]) for a fused parameter: from
    the hidden size where that decides it, else from the model type."""
    if hidden:
        gate_up = param.endswith("gate_up_proj")
        # gate_up's input and down's output are the hidden size
        if gate_up and shape[2] == hidden != shape[1]:
            return "experts"
        if gate_up and shape[1] == hidden != shape[2]:
            return "experts_t"
        if not gate_up and shape[1] == hidden != shape[2]:
            return "experts"
        if not gate_up and shape[2] == hidden != shape[1]:
            return "experts_t"
    return "experts_t" if model_type in TRANSPOSED_TYPES else "experts"


def peft_modules(keys: list[str], target_parameters: list[str]) -> dict[str, str]:
    """PEFT module keys of parameter wrappers → the parameter each adapts:
    ``m.experts.base_layer`` → ``m.experts.gate_up_proj`` (the innermost wrapper adapts the
    first parameter), ``m.q_proj`` with ``q_proj.weight`` targeted → ``m.q_proj``."""
    by_module: dict[str, list[tuple[int, str]]] = {}
    for k in keys:
        base, depth = k, 0
        while base.endswith(".base_layer"):
            base, depth = base[: -len(".base_layer")], depth + 1
        if targeted(base, target_parameters):
            by_module.setdefault(base, []).append((depth, k))
    out = {}
    for base, items in by_module.items():
        params = targeted(base, target_parameters)
        if sorted(d for d, _ in items) != list(range(len(params))):
            raise FormatError(f"{base}: the adapter has {len(items)} parameter wrappers but "
                              f"target_parameters names {len(params)} parameters of it "
                              f"({', '.join(params)}): cannot tell which factors adapt which")
        for depth, k in items:
            param = params[len(params) - 1 - depth]
            if param != "weight" and param not in ("gate_up_proj", "down_proj"):
                raise FormatError(f"{base}.{param}: LoRA on this parameter is not supported "
                                  "(only weights and the fused expert parameters "
                                  "gate_up_proj and down_proj are)")
            out[k] = base if param == "weight" else f"{base}.{param}"
    return out


def peft_keys(names: list[str]) -> dict[str, str]:
    """The inverse for writing: parameter module name → PEFT module key, nesting the wrappers
    of one module in PEFT's order."""
    by_module: dict[str, list[str]] = {}
    for n in names:
        m = FUSED.match(n)
        if m is not None:
            by_module.setdefault(m.group("module"), []).append(m.group("param"))
    out = {}
    for module, params in by_module.items():
        params = param_order(params)
        for i, p in enumerate(params):
            out[f"{module}.{p}"] = module + ".base_layer" * (len(params) - 1 - i)
    return out


def check_pair(gate_up: tuple[int, int], down: tuple[int, int], module: str) -> None:
    """gate_up_proj (out 2I, in H) and down_proj (out H, in I) of one module must agree: else
    the wrappers were not nested as PEFT nests them."""
    if gate_up[0] != 2 * down[1] or gate_up[1] != down[0]:
        raise FormatError(f"{module}: the factors of gate_up_proj ({gate_up[0]} × {gate_up[1]}) "
                          f"and down_proj ({down[0]} × {down[1]}) do not fit together: the "
                          "adapter's parameter wrappers are not in PEFT's order")
