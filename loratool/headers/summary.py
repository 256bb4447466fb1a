"""What is in a checkpoint or adapter, from its headers alone: the ``inspect --json`` object
(docs/cli.md, "inspect --json"). Nothing here imports torch or reads tensor data (but the
one-value alphas of kohya files).

Example::

    summarize(open_checkpoint("model/")).total_params
"""

from __future__ import annotations

from collections import Counter

from ..about import __version__
from ..reports.inspect import GgufFacts, InspectReport, TensorEntry
from ..units import matches, natural_key
from .adapters import describe, detect
from .checkpoint import Checkpoint
from .gguf import GgufHeader

SCHEMA_VERSION = 1
# llama.cpp's general.file_type values, named as its converter names them
FILE_TYPES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0",
    8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M",
    16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K", 19: "MOSTLY_IQ2_XXS",
    20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M",
    28: "MOSTLY_IQ2_S", 29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M",
    32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0", 37: "MOSTLY_TQ2_0", 38: "MOSTLY_MXFP4_MOE",
    39: "MOSTLY_NVFP4", 40: "MOSTLY_Q1_0", 1024: "GUESSED"}


def summarize(ckpt: Checkpoint, filters: list[str] | None = None) -> InspectReport:
    """The ``inspect --json`` object for a checkpoint, from its headers.

    Example: ``summarize(open_checkpoint("model/")).total_params``.
    """
    kind, fmt = detect(ckpt)
    dtypes: Counter[str] = Counter()
    for i in ckpt.infos():
        dtypes[i.dtype] += i.params
    cfg = ckpt.config or {}
    arch = cfg.get("architectures") or []
    tensors = [TensorEntry(i.name, i.dtype, list(i.shape), i.params, i.nbytes, i.file.name)
               for i in sorted(ckpt.infos(), key=lambda i: natural_key(i.name))
               if matches(i.name, filters)]
    report = InspectReport(
        schema=SCHEMA_VERSION, loratool_version=__version__, source=ckpt.source,
        path=str(ckpt.path), kind=kind, format=fmt, container=ckpt.container,
        files=[f.name for f in ckpt.files], shards=len(ckpt.files),
        index=ckpt.index.name if ckpt.index else None, architecture=arch[0] if arch else None,
        model_type=cfg.get("model_type"), num_tensors=len(ckpt.tensors),
        total_params=ckpt.total_params, total_bytes=ckpt.total_bytes,
        dtypes=dict(dtypes.most_common()), metadata=ckpt.metadata, filter=filters or None,
        tensors=tensors)
    if filters and not tensors and ckpt.tensors:  # a hint: how names look here
        report.names_look_like = sorted(ckpt.tensors, key=natural_key)[len(ckpt.tensors) // 2]
    if ckpt.gguf is not None:
        report.architecture = ckpt.gguf.architecture
        report.gguf = gguf_facts(ckpt.gguf)
    if kind == "adapter":
        report.adapter, modules = describe(ckpt, fmt)
        report.modules = [m for m in modules if matches(m.name, filters)]
    return report


def gguf_facts(h: GgufHeader) -> GgufFacts:
    """What llama.cpp's metadata says: the file type, the shape of the model, every key."""
    file_type = h.kv.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        file_type = FILE_TYPES.get(file_type, file_type)
    return GgufFacts(
        version=h.version, name=h.kv.get("general.name"), type=h.kv.get("general.type", "model"),
        file_type=file_type, context_length=h.arch_value("context_length"),
        block_count=h.arch_value("block_count"),
        embedding_length=h.arch_value("embedding_length"),
        head_count=h.arch_value("attention.head_count"),
        head_count_kv=h.arch_value("attention.head_count_kv"),
        expert_count=h.arch_value("expert_count"), lora_alpha=h.kv.get("adapter.lora.alpha"),
        alignment=h.alignment, metadata=h.kv)
