"""The PyTorch side of ``export``: the model transformers builds from the base's config (with
its weights, or on the meta device: shapes only), the adapters merged into its parameters by
the merge code, the wrapper that gives the one output the graph has, and the random token
batches that trace and verify it.

Example::
    model = load_model(base.folder, "causal-lm", config)
    merge_in_memory(model, base, adapters, [1.0], ["adapter/"])
    logits = wrapper(model, "causal-lm")(**batch(["input_ids", "attention_mask"], 2, 8,
                                                  vocab(config), torch.Generator()))
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine import kernel
from ..engine.plan import plan_edits
from ..errors import FormatError
from ..headers.checkpoint import Checkpoint
from ..model.adapter import LoraAdapter
from .export_cache import quiet_exporter

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class GraphSpec:
    """What an export traces: the architecture (``config``, ``task``), its dtype and opset,
    the input names and the one output, and the example batch it is traced with."""

    config: PretrainedConfig
    task: str
    dtype: str
    opset: int | None
    names: list[str]
    output: str
    example: dict[str, torch.Tensor]


class Wrapper(torch.nn.Module):
    """The traced module: logits (causal LM) or last hidden state, no cache."""

    def __init__(self, model: torch.nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if self.task == "causal-lm":
            out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False, **extra).logits
            return out
        hidden: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                          **extra).last_hidden_state
        return hidden


def wrapper(model: torch.nn.Module, task: str) -> Wrapper:
    """``model`` as the graph runs it, in eval mode."""
    return Wrapper(model, task).eval()


def meta_model(config: PretrainedConfig, task: str, dtype: str) -> Wrapper:
    """The architecture with meta parameters: every shape, no memory."""
    import transformers

    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    with quiet_exporter(), torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=False, dtype=torch.float32).eval()
    if dtype == "fp16":
        model = model.half()
    return wrapper(model, task)


def load_model(folder: Path, task: str, config: PretrainedConfig) -> torch.nn.Module:
    """The base's model as transformers builds it from ``config`` and its weights, in
    float32; a checkpoint that lacks weights the architecture needs is refused."""
    import transformers

    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()
    try:
        with quiet_exporter():
            model, info = cls.from_pretrained(folder, config=config, dtype=torch.float32,
                                              trust_remote_code=False,
                                              output_loading_info=True)
    except ValueError as e:
        raise FormatError(f"{folder}: transformers cannot build {config.model_type!r} for "
                          f"task {task} ({str(e).splitlines()[0]})") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values: never export those
        raise FormatError(f"{folder}: the checkpoint lacks {len(missing)} weights the "
                          f"architecture needs (first: {missing[0]}); is it complete?")
    loaded: torch.nn.Module = model.eval()
    return loaded


def input_names(model: torch.nn.Module, config: PretrainedConfig) -> list[str]:
    """The inputs a tokenizer gives this model: ids and mask, and token_type_ids where the
    model has token types (BERT and its kin; GPT-2 takes the argument but has no types)."""

    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters and int(
            getattr(config, "type_vocab_size", 0) or 0) > 0:
        names.append("token_type_ids")
    return names


def _related(a: str, b: str) -> bool:
    """One parameter name is the other, or ends with it after a dot."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def merge_in_memory(model: torch.nn.Module, base: Checkpoint, adapters: list[LoraAdapter],
                    weights: list[float], specs: list[str], partial: bool = False) -> int:
    """Apply the adapters to the model's parameters with the merge code's math; the number
    of tensors changed (``partial``: a model of the first layers only, which lacks the later
    layers' parameters)."""

    if not adapters:
        return 0
    edits, _ = plan_edits(base, adapters, weights, specs)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))

    def find(name: str) -> torch.Tensor:
        if name in params:
            return params[name]
        hits = [p for n, p in params.items() if n.endswith("." + name) or name.endswith(
            "." + n)]
        if len(hits) == 1:
            return hits[0]
        raise FormatError(f"cannot find {name} among the model's parameters")

    with torch.no_grad():
        for name, e in edits.items():
            if partial and not any(_related(n, name) for n in params):
                continue
            p = find(name)
            W = p.data.to(torch.float32, copy=True)
            new = kernel.merged(W, e, 1.0, torch.device("cpu"), name=name)
            if new.shape != p.shape:
                raise FormatError(f"{name}: a resized full tensor cannot be exported in place")
            p.data.copy_(new.to(p.dtype))
    return len(edits)


@dataclass(frozen=True)
class Vocab:
    """What random token batches need of a config: vocabulary size, token types, pad id."""

    size: int
    types: int
    pad: int


def vocab(config: PretrainedConfig) -> Vocab:
    """The config's vocabulary, as random test batches draw from it."""
    pad = getattr(config, "pad_token_id", None)
    return Vocab(int(getattr(config, "vocab_size", 1000)),
                 int(getattr(config, "type_vocab_size", 0) or 0),
                 int(pad) if isinstance(pad, int) else 0)


def batch(names: list[str], rows: int, seq: int, v: Vocab, g: torch.Generator,
          padded: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs by name; ``padded`` right-pads rows 1 and 2 as a tokenizer would."""

    ids = torch.randint(0, v.size, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 11:] = 0
        mask[2, 6:] = 0
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, v.pad))
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:  # a second segment in the later half of each row
        out["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(rows, seq) \
            .clone() % max(v.types, 1)
    return out
