"""``loratool inspect``: what is in a checkpoint or adapter, from headers alone.

:func:`summarize` builds the documented JSON object (docs/cli.md, "inspect --json");
:func:`compare` adds the tensor-by-tensor comparison of ``--against``; ``render.py`` turns
both into the human tables. Nothing here prints.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from . import __version__
from .checkpoint import Checkpoint
from .tensorfile import TensorInfo, dtype_code
from .units import matches, natural_key
from .formats import detect
from .progress import SILENT, Progress

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
            from .formats import peft

            facts = peft.describe(ckpt)
            data["modules"] = [m for m in facts.pop("modules") if matches(m["name"], filters)]
            data["adapter"] = facts
        else:
            # kohya alphas and diffusers configs live in tensors and metadata: read the
            # (small) adapter itself
            from .formats import read_checkpoint

            ad = read_checkpoint(ckpt)
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
        import gguf

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


def compare(a: Checkpoint, b: Checkpoint, filters: list[str] | None = None,
            progress: Progress = SILENT) -> dict[str, Any]:
    """Compare two checkpoints tensor by tensor: names, shapes, dtypes and ‖B−A‖/‖A‖.

    Norms are accumulated in float64 over row chunks, so memory stays near one tensor.
    Example: ``compare(open_checkpoint(base), open_checkpoint(tuned))["changed"]``.
    """
    import torch

    na = [n for n in a.tensors if matches(n, filters)]
    nb = [n for n in b.tensors if matches(n, filters)]
    sb = set(nb)
    sa = set(na)
    only_a = [n for n in na if n not in sb]
    only_b = [n for n in nb if n not in sa]
    shape_diff, dtype_diff, changed = [], [], []
    unchanged = 0
    common = [n for n in na if n in sb]
    bar = progress.bar("compare", total=sum(a.tensors[n].nbytes for n in common), unit="B")
    for n in common:
        ia, ib = a.tensors[n], b.tensors[n]
        bar.update(ia.nbytes)
        if ia.shape != ib.shape:
            shape_diff.append({"name": n, "shape": list(ia.shape), "other_shape": list(ib.shape)})
            continue
        if ia.dtype != ib.dtype:
            dtype_diff.append({"name": n, "dtype": ia.dtype, "other_dtype": ib.dtype})
        ta, tb = a.load(n), b.load(n)
        if ia.dtype == ib.dtype and torch.equal(ta, tb):
            unchanged += 1
            continue
        ss_d, ss_a, max_abs = _diff_sums(ta, tb)
        if math.isnan(ss_d) and ia.dtype == ib.dtype and torch.equal(
                ta.isnan(), tb.isnan()) and torch.equal(ta.nan_to_num(0.0), tb.nan_to_num(0.0)):
            unchanged += 1  # the same values, NaN where the other has NaN
            continue
        if ss_d == 0.0 and ia.dtype != ib.dtype:
            unchanged += 1
            continue
        norm_a = math.sqrt(ss_a)
        # JSON has no inf or NaN: a zero base norm or NaN data gives null
        changed.append({"name": n, "shape": list(ia.shape), "diff_norm": _finite(math.sqrt(ss_d)),
                        "norm": _finite(norm_a),
                        "rel_diff": _finite(math.sqrt(ss_d) / norm_a) if norm_a else None,
                        "max_abs_diff": _finite(max_abs)})
        del ta, tb
    bar.close()
    return {"other": b.source, "only_in_path": only_a, "only_in_other": only_b,
            "shape_mismatch": shape_diff, "dtype_mismatch": dtype_diff, "changed": changed,
            "unchanged": unchanged, "compared": len(common)}


def _diff_sums(ta: Any, tb: Any) -> tuple[float, float, float]:
    """Σ(b − a)², Σa² and max |b − a|, a chunk of 1M values at a time (in cache, one pass
    over each tensor), summed in float64 across chunks."""
    import torch

    fa, fb = ta.reshape(-1), tb.reshape(-1)
    # bf16/fp16 values and their differences are exact in float32 (the fast path for the
    # checkpoints people compare); float32 data is compared in float64, as exactly as before
    half = (torch.bfloat16, torch.float16)
    work = torch.float32 if ta.dtype in half and tb.dtype in half else torch.float64
    ss_d = ss_a = max_abs = 0.0
    step = 1 << 20
    for s in range(0, fa.numel(), step):
        ca, cb = fa[s:s + step].to(work), fb[s:s + step].to(work)
        d = cb - ca  # (cb may be the loaded tensor itself: not in place)
        ss_d += _sum_squares(d)
        ss_a += _sum_squares(ca)
        lo, hi = torch.aminmax(d)
        max_abs = max(max_abs, -float(lo), float(hi))
    return ss_d, ss_a, max_abs


def _sum_squares(x: Any) -> float:
    """Σx² of a 1-D chunk: norms of rows of 1024 values (short float32 sums, as
    ops.sum_squares), squared and summed in float64; one long float32 sum drifts by 1e-4."""
    import torch

    from . import ops

    if x.dtype == torch.float64:
        return float(torch.dot(x, x))
    n = x.numel() // 1024 * 1024
    head = ops.sum_squares(x[:n].view(-1, 1024)) if n else 0.0
    return head + float(torch.linalg.vector_norm(x[n:].double())) ** 2 if n < x.numel() \
        else head


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
