"""Which tensors two checkpoints share and how a changed one is stored, from names and shapes
alone: the token embeddings and output heads (and whether a model ties them), GPT-2's Conv1D,
the layout ``extract`` and ``analyze`` give each changed tensor. Never imports torch, so that
``prechecks`` can count what an extract writes whatever the ranks before torch loads.

Example::
    kind("model.layers.0.mlp.up_proj.weight", (688, 256), "llama", False)  # "linear"
"""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import FormatError, LoraToolError
from ..units import matches
from . import moe
from .checkpoint import Checkpoint

HEAD_ARCHS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")


def ties_embeddings(config: dict[str, object] | None, tensor_names: Iterable[str]) -> bool:
    """Whether a model's output head shares the input embeddings' weight: a language model
    whose checkpoint holds no head tensor (transformers saves a tied head once), unless its
    config says otherwise."""
    cfg = config or {}
    archs = cfg.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith(HEAD_ARCHS) for a in archs):
        return False
    if any(n.endswith(("lm_head.weight", "embed_out.weight")) for n in tensor_names):
        return False
    return bool(cfg.get("tie_word_embeddings", True))


# lookup tables (token, position, relative-position): a LoRA on them is PEFT's embedding
# LoRA, never a linear one; extract stores them in full by default
EMBEDDING = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared|relative_attention_bias)\.weight$")
HEAD_TENSOR = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
_INPUT_EMBEDDING = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                    "embed_in.weight", "shared.weight")


def input_embedding(tensor_names: Iterable[str]) -> str | None:
    """The name of a model's token-embedding tensor, or None."""
    return next((n for n in tensor_names if n.endswith(_INPUT_EMBEDDING)), None)


CONV1D_TYPES = {"gpt2", "openai-gpt", "decision_transformer", "imagegpt"}
CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")


def kind(name: str, shape: tuple[int, ...], model_type: str | None, embed_lora: bool) -> str:
    """How a changed tensor is stored: linear / fan_in_fan_out / embedding / conv / full."""

    if model_type in moe.FUSING_TYPES and moe.ROUTER.search(name):
        return "full"  # a router is a bare parameter in transformers 5: no Linear to wrap
    if HEAD_TENSOR.search(name) and len(shape) == 2:
        return "linear" if embed_lora else "full"
    if EMBEDDING.search(name) and len(shape) == 2:
        return "embedding" if embed_lora else "full"
    if moe.FUSED.match(name) and len(shape) == 3:
        return moe.orientation(name, shape, model_type, None)
    if not name.endswith(".weight"):
        return "full"
    if len(shape) == 2:
        if model_type in CONV1D_TYPES and CONV1D_NAMES.search(name):
            return "fan_in_fan_out"  # GPT-2's Conv1D stores [in, out]
        return "linear"
    if len(shape) in (3, 4, 5):
        return "conv"
    return "full"


def pairs(base: Checkpoint, tuned: Checkpoint, targets: list[str], excludes: list[str]
          ) -> list[str]:
    """Names to compare; a name in one model only is an error naming it (after filters)."""
    def keep(n: str) -> bool:
        return matches(n, targets) and not (excludes and matches(n, excludes))

    def weight(ckpt: Checkpoint, n: str) -> bool:
        # integer buffers (BERT's position_ids, which newer transformers no longer saves) are
        # not weights: one model having them and the other not is no mismatch
        return ckpt.tensors[n].dtype.startswith(("F", "BF"))

    names = [n for n in base.tensors if keep(n) and (n in tuned.tensors or weight(base, n))]
    only_tuned = [n for n in tuned.tensors if keep(n) and n not in base.tensors
                  and weight(tuned, n)]
    only_base = [n for n in names if n not in tuned.tensors]
    if only_base or only_tuned:
        which = (f"{only_base[0]} is in the base but not the tuned model" if only_base else
                 f"{only_tuned[0]} is in the tuned model but not the base")
        raise FormatError(f"the models do not match: {which} ({len(only_base)} + "
                          f"{len(only_tuned)} such tensors); are they the same architecture? "
                          "--exclude GLOB leaves tensors out")
    if not names:
        some = sorted(base.tensors)[len(base.tensors) // 2] if base.tensors else None
        raise LoraToolError("no tensors to compare (check --target/--exclude)"
                            + (f"; names here look like {some}" if some else ""))
    return names


# extract's fixed cost, what it writes whatever the ranks, in parts: their labels
BIAS_CHANGES = "bias changes"
RESIZED = "resized tensors in full"


def stored_in_full(name: str, embed_lora: bool) -> tuple[str, str | None]:
    """How extract counts a changed tensor it stores in full (not a bias, not resized): the
    label of its part of the fixed cost, and the option that would leave it out (None when
    none would). Shared with the check made before torch loads, so that both say the same."""
    if EMBEDDING.search(name) or HEAD_TENSOR.search(name):
        return "embeddings and heads in full", None if embed_lora else "--embed-lora"
    return "norms and other tensors in full", "--skip-full"
