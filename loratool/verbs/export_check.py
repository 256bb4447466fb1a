"""Before ``export`` builds anything: the config checked against the checkpoint, and the
memory the export will need against what the machine has.

A ``config.json`` is only a claim. An export builds the model the config describes, so a
config that does not match the weights (``hidden_size: 200000`` beside a 256-wide checkpoint,
``num_hidden_layers: 100000`` beside two layers) would allocate terabytes or run for minutes
before anything compared it with the weights. Here the layer count is compared first (from
the tensor names alone), then the architecture is built on the meta device (shapes, no
memory) and every parameter it needs is looked up in the checkpoint with its shape; only a
config that describes these weights goes on, and only when the memory its export needs is
there.

Example::
    need = check_config(base, config, "causal-lm", "fp32", stream=False)
    need.need_gb, need.available_gb
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ..errors import FormatError, LoraToolError
from ..headers.changes import input_embedding
from ..headers.checkpoint import Checkpoint
from .export_model import meta_model
from .export_stream import source

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_FIRST_INDEX = re.compile(r"\.(\d+)\.")
GB = 1e9


@dataclass(frozen=True)
class MemoryNeed:
    """The memory an export needs at its peak and what the machine has (NaN: not known)."""

    need_gb: float
    available_gb: float


def checkpoint_layers(names: Iterable[str]) -> int:
    """Layers a checkpoint holds: one more than the largest first index in its tensor names
    (``model.layers.3.mlp.experts.7.w1`` is layer 3); 0 when no name has one."""
    top = -1
    for n in names:
        m = _FIRST_INDEX.search(n)
        if m:
            top = max(top, int(m.group(1)))
    return top + 1


def _claimed_layers(config: PretrainedConfig) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def load_config(base: Checkpoint, spec: str) -> PretrainedConfig:
    """transformers' config of the base (never custom code), or one line saying why not."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(base.folder, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise FormatError(f"{spec}: transformers does not know this architecture "
                          f"({str(e).splitlines()[0]}); custom code is never run") from e
    except Exception as e:  # huggingface_hub's strict-dataclass validators: no shared base
        if "Validation" not in type(e).__name__ and not isinstance(e, TypeError):
            raise
        why = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise FormatError(f"{spec}: config.json is not valid for its architecture "
                          f"({(why or [type(e).__name__])[-1][:200]})") from e


def check_config(base: Checkpoint, config: PretrainedConfig, task: str, dtype: str,
                 stream: bool) -> MemoryNeed:
    """Refuse a config that does not describe the checkpoint, or an export the machine has
    not the memory for; the estimate (``need_gb``, ``available_gb``) otherwise."""
    where = base.source or base.path
    claimed, held = _claimed_layers(config), checkpoint_layers(base.tensors)
    if claimed is not None and held and claimed > held:
        first = next(n for n in base.tensors if _FIRST_INDEX.search(n))
        missing = _FIRST_INDEX.sub(f".{held}.", first, count=1)
        raise FormatError(f"{where}: the checkpoint lacks {missing} and the rest of layers "
                          f"{held}–{claimed - 1}: config.json says {claimed:,} layers, it "
                          f"holds {held} (the config does not belong to these weights, or the "
                          "checkpoint is incomplete)")

    try:
        meta = meta_model(config, task, "fp32")
    except (ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise FormatError(f"{where}: transformers cannot build the model config.json "
                          f"describes ({str(e).splitlines()[0][:160]})") from e
    tied = input_embedding(base.tensors)
    largest = 0
    for name, p in meta.named_parameters():
        src = source(name, base, tied)
        if src is None:
            raise FormatError(f"{where}: the architecture in config.json needs "
                              f"{name.removeprefix('model.')} {list(p.shape)}, which the "
                              "checkpoint lacks; the config does not belong to these weights")
        have = tuple(base.tensors[src].shape)
        if have != tuple(p.shape):
            raise FormatError(f"{where}: config.json describes {src} as {list(p.shape)} but "
                              f"the checkpoint holds {list(have)}; the config does not belong "
                              "to these weights")
        largest = max(largest, p.numel())
    if claimed is not None and held > claimed:
        raise FormatError(f"{where}: the checkpoint holds {held} layers but config.json says "
                          f"{claimed}; exporting would leave layers out")
    params = sum(p.numel() for p in meta.parameters())
    need = export_memory(params, largest, claimed or 1, dtype, stream)
    have_bytes = available_memory()
    if have_bytes is not None and need > have_bytes:
        streamed = export_memory(params, largest, claimed or 1, dtype, True)
        how = "" if stream else f"; `--stream` needs about {streamed / GB:.1f} GB"
        raise LoraToolError(f"exporting {where} ({params / 1e9:.2f} B parameters) needs about "
                            f"{need / GB:.1f} GB of memory and {have_bytes / GB:.1f} GB is "
                            f"available{how}; free memory or use a bigger machine")
    return MemoryNeed(need_gb=need / GB, available_gb=(have_bytes or math.nan) / GB)


def export_memory(params: int, largest: int, layers: int, dtype: str, stream: bool) -> float:
    """Bytes an export needs at its peak, from measurements of ours: in memory, the float32
    model and about 1.2× more for the traced program and the session that verifies it (665 M
    parameters: 5.7 GB); streamed, the largest tensor a few times over and one layer of the
    stand-in model (1.5 B parameters: 2.1 GB), plus the interpreter with torch and
    transformers (0.5 GB)."""
    overhead = 0.5 * GB
    if not stream:
        return 2.2 * 4 * params + overhead
    per_layer = 4 * params / max(layers, 1)
    return 6 * 4 * largest + 2 * per_layer + overhead


def available_memory() -> int | None:
    """Memory this process may still take: MemAvailable (Linux), else None (not checked)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if hasattr(os, "sysconf"):  # pragma: no cover - not Linux
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None
