"""``loratool inspect``: what is in a checkpoint or adapter, from headers alone.

:func:`summarize` builds the documented JSON object (docs/cli.md, "inspect --json");
:func:`compare` adds the tensor-by-tensor comparison of ``--against``; ``render.py`` turns
both into the human tables. Nothing here prints.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import gguf

from .. import __version__
from ..formats import detect, peft, read_checkpoint
from ..headers.checkpoint import Checkpoint
from ..headers.safetensors import TensorInfo
from ..headers.units import matches, natural_key
from ..io.tensors import dtype_code, open_checkpoint

SCHEMA_VERSION = 1


def _tensor_entry(i: TensorInfo) -> dict[str, Any]:
    return {"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "params": i.params,
            "bytes": i.nbytes, "file": i.file.name}


def summarize(ckpt: Checkpoint, filters: list[str] | None = None) -> dict[str, Any]:
    """The ``inspect --json`` object for a checkpoint (headers only; torch is not imported).

    Example: ``summarize(open_checkpoint("model/"))["total_params"]``.
    """
    kind, fmt = detect(ckpt)
    dtypes: Counter[str] = Counter()
    for i in ckpt.infos():
        dtypes[i.dtype] += i.params
    cfg = ckpt.config or {}
    arch = cfg.get("architectures") or []
    data: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "loratool_version": __version__,
        "source": ckpt.source,
        "path": str(ckpt.path),
        "kind": kind,
        "format": fmt,
        "container": ckpt.container,
        "files": [f.name for f in ckpt.files],
        "shards": len(ckpt.files),
        "index": ckpt.index.name if ckpt.index else None,
        "architecture": arch[0] if arch else None,
        "model_type": cfg.get("model_type"),
        "num_tensors": len(ckpt.tensors),
        "total_params": ckpt.total_params,
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(dtypes.most_common()),
        "metadata": ckpt.metadata,
        "filter": filters or None,
        "tensors": [_tensor_entry(i)
                    for i in sorted(ckpt.infos(), key=lambda i: natural_key(i.name))
                    if matches(i.name, filters)],
    }
    if filters and not data["tensors"] and ckpt.tensors:  # a hint: how names look here
        data["names_look_like"] = sorted(ckpt.tensors, key=natural_key)[
            len(ckpt.tensors) // 2]
    if ckpt.gguf is not None:
        data["architecture"] = ckpt.gguf.architecture
        data["gguf"] = gguf_facts(ckpt.gguf)
    if kind == "adapter":
        if fmt == "peft":
            facts = peft.describe(ckpt)
            data["modules"] = [m for m in facts.pop("modules") if matches(m["name"], filters)]
            data["adapter"] = facts
        else:
            # kohya alphas and diffusers configs live in tensors and metadata: read the
            # (small) adapter itself

            ad = read_checkpoint(ckpt if ckpt.reader else open_checkpoint(ckpt.source))
            data["modules"] = [m for m in describe_modules(ad) if matches(m["name"], filters)]
            r, alpha = ad.common()
            data["adapter"] = {
                "peft_type": "LYCORIS" if ad.lyco else "LORA", "base_model": ad.base_model,
                "base_model_revision": None,
                "task_type": None, "r": r, "lora_alpha": alpha,
                "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in (
                    *ad.modules.values(), *ad.lyco.values())}),
                "use_rslora": any(m.rslora for m in ad.modules.values()),
                "use_dora": any(m.magnitude is not None for m in ad.modules.values()),
                "modules_to_save": None, "full_tensors": sorted(ad.full),
                "components": [c for c in ad.components if c],
                "unresolved_names": bool(ad.unresolved),
            }
    return data


def gguf_facts(h: Any) -> dict[str, Any]:
    """What llama.cpp's metadata says: the file type, the shape of the model, every key."""
    def arch(key: str) -> Any:
        return h.arch_value(key)

    file_type = h.kv.get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name if isinstance(file_type, int) \
            else file_type
    except (ImportError, ValueError):
        pass
    return {"version": h.version, "name": h.kv.get("general.name"), "type":
            h.kv.get("general.type", "model"), "file_type": file_type,
            "context_length": arch("context_length"), "block_count": arch("block_count"),
            "embedding_length": arch("embedding_length"),
            "head_count": arch("attention.head_count"),
            "head_count_kv": arch("attention.head_count_kv"),
            "expert_count": arch("expert_count"),
            "lora_alpha": h.kv.get("adapter.lora.alpha"), "alignment": h.alignment,
            "metadata": h.kv}


def describe_modules(ad: Any) -> list[dict[str, Any]]:
    """The ``modules`` entries of ``inspect --json`` for an adapter read into memory."""

    out = []
    for m in ad.modules.values():
        shape = m.base_shape
        in_f, out_f = ((shape[0], shape[1]) if m.layout in ("fan_in_fan_out", "embedding")
                       else (shape[1] if len(shape) > 1 else None, shape[0]))
        if m.experts:  # [E, out, in] (experts_t: [E, in, out])
            shape = shape[1:] if m.layout == "experts" else shape[:0:-1]
        e = {"name": m.key, "type": "lora", "rank": m.rank, "alpha": m.alpha,
             "scale": m.scale,
             "layout": m.layout, "in_features": in_f, "out_features": out_f,
             "rslora": m.rslora, "dora": m.magnitude is not None, "bias": m.bias is not None,
             "dtype": dtype_code(m.A.dtype)}
        if m.kernel:
            e["kernel"] = m.kernel
        if m.experts:
            e["experts"] = m.experts
        out.append(e)
    for lm in ad.lyco.values():
        shape = lm.shape
        # a 2-D LoHa/LoKr ΔW is a linear layer's, or a conv's stored flat: without the base,
        # which one is not known, and is not guessed
        flat = lm.kind != "full" and len(shape) == 2 and not lm.shape_from_base
        out.append({"name": lm.key, "type": lm.kind, "rank": lm.rank, "alpha": lm.alpha,
                    "scale": lm.scale, "layout": "2-D" if flat else lm.layout,
                    "factors": lm.describe(),
                    "in_features": math.prod(shape[1:]) if len(shape) > 1 else None,
                    "out_features": shape[0], "rslora": False,
                    "dora": lm.magnitude is not None, "bias": lm.bias is not None,
                    "dtype": dtype_code(next(iter(lm.parts.values())).dtype)})
    return out
