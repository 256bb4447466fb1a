"""``loratool inspect``: what is in a checkpoint or adapter, from headers alone.

:func:`summarize` builds the documented JSON object (docs/cli.md, "inspect --json");
:func:`compare` adds the tensor-by-tensor comparison of ``--against``; the ``format_*``
functions turn both into the human tables. Nothing here prints.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from typing import Any, Iterable

from . import __version__
from .checkpoint import Checkpoint, TensorInfo, dtype_code, natural_key
from .formats import detect
from .progress import SILENT, Progress

SCHEMA_VERSION = 1
_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")


def _matches(name: str, globs: Iterable[str] | None) -> bool:
    globs = list(globs or [])
    return not globs or any(fnmatch.fnmatchcase(name, g) for g in globs)


def _tensor_entry(ckpt: Checkpoint, i: TensorInfo) -> dict[str, Any]:
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
        "tensors": [_tensor_entry(ckpt, i)
                    for i in sorted(ckpt.infos(), key=lambda i: natural_key(i.name))
                    if _matches(i.name, filters)],
    }
    if kind == "adapter":
        if fmt == "peft":
            from .formats import peft

            facts = peft.describe(ckpt)
            data["modules"] = [m for m in facts.pop("modules") if _matches(m["name"], filters)]
            data["adapter"] = facts
        else:
            # kohya alphas and diffusers configs live in tensors and metadata: read the
            # (small) adapter itself
            from .formats import read_checkpoint

            ad = read_checkpoint(ckpt)
            data["modules"] = [m for m in describe_modules(ad) if _matches(m["name"], filters)]
            r, alpha = ad.common()
            data["adapter"] = {
                "peft_type": "LORA", "base_model": ad.base_model, "base_model_revision": None,
                "task_type": None, "r": r, "lora_alpha": alpha,
                "target_modules": sorted({m.name.rsplit(".", 1)[-1]
                                          for m in ad.modules.values()}),
                "use_rslora": any(m.rslora for m in ad.modules.values()),
                "use_dora": any(m.magnitude is not None for m in ad.modules.values()),
                "modules_to_save": None, "full_tensors": sorted(ad.full),
                "components": [c for c in ad.components if c],
                "unresolved_names": bool(getattr(ad, "unresolved", [])),
            }
    return data


def describe_modules(ad: Any) -> list[dict[str, Any]]:
    """The ``modules`` entries of ``inspect --json`` for an adapter read into memory."""
    out = []
    for m in ad.modules.values():
        shape = m.base_shape
        in_f, out_f = ((shape[0], shape[1]) if m.layout in ("fan_in_fan_out", "embedding")
                       else (shape[1] if len(shape) > 1 else None, shape[0]))
        e = {"name": m.key, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
             "layout": m.layout, "in_features": in_f, "out_features": out_f,
             "rslora": m.rslora, "dora": m.magnitude is not None, "bias": m.bias is not None,
             "dtype": dtype_code(m.A.dtype)}
        if m.kernel:
            e["kernel"] = m.kernel
        out.append(e)
    return out


def compare(a: Checkpoint, b: Checkpoint, filters: list[str] | None = None,
            progress: Progress = SILENT) -> dict[str, Any]:
    """Compare two checkpoints tensor by tensor: names, shapes, dtypes and ‖B−A‖/‖A‖.

    Norms are accumulated in float64 over row chunks, so memory stays near one tensor.
    Example: ``compare(open_checkpoint(base), open_checkpoint(tuned))["changed"]``.
    """
    import torch

    na = [n for n in a.tensors if _matches(n, filters)]
    nb = [n for n in b.tensors if _matches(n, filters)]
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
        if ia.dtype == ib.dtype and (torch.equal(ta, tb) or (
                ta.is_floating_point() and torch.equal(ta.isnan(), tb.isnan())
                and torch.equal(ta.nan_to_num(0.0), tb.nan_to_num(0.0)))):
            unchanged += 1
            continue
        ss_d = ss_a = 0.0
        max_abs = 0.0
        fa, fb = ta.reshape(-1), tb.reshape(-1)
        step = 1 << 22  # 4M elements: 32 MB of float64 per chunk
        for s in range(0, fa.numel(), step):
            ca, cb = fa[s:s + step].double(), fb[s:s + step].double()
            d = cb - ca
            ss_d += float(d.square().sum())
            ss_a += float(ca.square().sum())
            if d.numel():
                max_abs = max(max_abs, float(d.abs().max()))
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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- human output


def human_count(n: float) -> str:
    """``163_840_000`` → ``163.8M``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    """``1_500_000`` → ``1.50 MB`` (powers of 1000, as the Hub shows sizes)."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c])
                 for c in range(len(r))]
        out.append("  ".join(cells).rstrip())
    return out


def group_tensors(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold names that differ only in layer numbers: ``layers.*.mlp.up_proj.weight ×32``."""
    groups: dict[str, dict[str, Any]] = {}
    for t in tensors:
        key = _LAYER.sub("*", t["name"])
        g = groups.setdefault(key, {"name": key, "count": 0, "dtypes": [], "shapes": [],
                                    "params": 0, "first": t["name"]})
        g["count"] += 1
        g["params"] += t["params"]
        if t["dtype"] not in g["dtypes"]:
            g["dtypes"].append(t["dtype"])
        if t["shape"] not in g["shapes"]:
            g["shapes"].append(t["shape"])
    for g in groups.values():
        if g["count"] == 1:
            g["name"] = g["first"]
    return list(groups.values())


def _shape(s: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def format_summary(data: dict[str, Any], expand: bool = False) -> str:
    """The human view of :func:`summarize`; ``expand`` lists every tensor instead of groups."""
    lines = []
    what = data["architecture"] or data["model_type"] or "unknown architecture"
    lines.append(f"{data['source']}: {data['kind']} ({data['format']}), {what}")
    shard_note = f"{data['shards']} file" + ("s" if data["shards"] != 1 else "")
    if data["index"]:
        shard_note += f" via {data['index']}"
    dts = ", ".join(f"{k} {human_count(v)}" for k, v in data["dtypes"].items())
    lines.append(f"  {data['num_tensors']} tensors, {human_count(data['total_params'])} "
                 f"parameters ({data['total_params']:,}), {human_bytes(data['total_bytes'])}, "
                 f"{shard_note}")
    lines.append(f"  dtypes: {dts or 'none'}")
    tensors = data["tensors"]
    if data.get("filter"):
        lines.append(f"  filter {' '.join(data['filter'])}: {len(tensors)} tensors match")
    if data["kind"] == "adapter":
        lines += _format_adapter(data)
    if tensors:
        lines.append("")
        if expand or data.get("filter"):
            rows = [["name", "dtype", "shape", "params"]]
            rows += [[t["name"], t["dtype"], _shape(t["shape"]), human_count(t["params"])]
                     for t in tensors]
        else:
            rows = [["name", "count", "dtype", "shape", "params"]]
            for g in group_tensors(tensors):
                shapes = " | ".join(_shape(s) for s in g["shapes"][:3])
                if len(g["shapes"]) > 3:
                    shapes += f" | … ({len(g['shapes'])} shapes)"
                count = f"×{g['count']}" if g["count"] > 1 else ""
                rows.append([g["name"], count, "/".join(g["dtypes"]), shapes,
                             human_count(g["params"])])
        lines += _table(rows, right={len(rows[0]) - 1})
        if not expand and not data.get("filter") and len(rows) - 1 < len(tensors):
            lines.append(f"({len(tensors)} tensors in {len(rows) - 1} groups; --all lists "
                         "each, --filter GLOB selects)")
    return "\n".join(lines)


def _format_adapter(data: dict[str, Any]) -> list[str]:
    a = data.get("adapter") or {}
    mods = data.get("modules") or []
    lines = []
    if "note" in a:
        return [f"  {a['note']}"]
    base = a.get("base_model") or "not named"
    if a.get("base_model_revision"):
        base += f"@{a['base_model_revision']}"
    flags = [f for f, on in (("rsLoRA", a.get("use_rslora")), ("DoRA", a.get("use_dora"))) if on]
    lines.append(f"  base model: {base}; peft_type {a.get('peft_type')}; task "
                 f"{a.get('task_type') or '-'}" + (f"; {', '.join(flags)}" if flags else ""))
    tm = a.get("target_modules")
    lines.append(f"  target modules: {', '.join(tm) if isinstance(tm, list) else tm}")
    if a.get("modules_to_save") or a.get("full_tensors"):
        lines.append(f"  full tensors (modules_to_save): {len(a.get('full_tensors') or [])}")
    if mods:
        ranks = Counter(m["rank"] for m in mods)
        lines.append(f"  {len(mods)} LoRA modules; ranks: "
                     + ", ".join(f"{r} ×{c}" for r, c in sorted(ranks.items())))
        rows = [["module", "count", "rank", "alpha", "scale", "layout", "in→out"]]
        grouped: dict[tuple[Any, ...], dict[str, Any]] = {}
        for m in mods:
            key = (_LAYER.sub("*", m["name"]), m["rank"], m["alpha"], m["scale"], m["layout"],
                   m["in_features"], m["out_features"])
            g = grouped.setdefault(key, {"count": 0, "first": m["name"]})
            g["count"] += 1
        for key, g in grouped.items():
            name = key[0] if g["count"] > 1 else g["first"]
            rows.append([name, f"×{g['count']}", str(key[1]), f"{key[2]:g}", f"{key[3]:.4g}",
                         key[4], f"{key[5]}→{key[6]}"])
        lines.append("")
        lines += ["  " + r for r in _table(rows, right={1, 2, 3, 4})]
    return lines


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3e}"


def format_compare(data: dict[str, Any], cmp: dict[str, Any], expand: bool = False) -> str:
    """The human view of :func:`compare`."""
    lines = [f"{data['source']} vs {cmp['other']}: {cmp['compared']} tensors in both, "
             f"{len(cmp['changed'])} changed, {cmp['unchanged']} identical"]
    for key, label in (("only_in_path", f"only in {data['source']}"),
                       ("only_in_other", f"only in {cmp['other']}")):
        if cmp[key]:
            shown = ", ".join(cmp[key][:8]) + (" …" if len(cmp[key]) > 8 else "")
            lines.append(f"  {len(cmp[key])} {label}: {shown}")
    for m in cmp["shape_mismatch"]:
        lines.append(f"  shape differs: {m['name']} {_shape(m['shape'])} vs "
                     f"{_shape(m['other_shape'])}")
    if cmp["dtype_mismatch"]:
        lines.append(f"  {len(cmp['dtype_mismatch'])} tensors differ in dtype, e.g. "
                     f"{cmp['dtype_mismatch'][0]['name']} {cmp['dtype_mismatch'][0]['dtype']} vs "
                     f"{cmp['dtype_mismatch'][0]['other_dtype']}")
    if not cmp["changed"]:
        return "\n".join(lines)
    lines.append("")
    if expand or len(cmp["changed"]) <= 40:
        rows = [["changed tensor", "shape", "‖ΔW‖/‖W‖", "max |ΔW|"]]
        rows += [[c["name"], _shape(c["shape"]), _num(c["rel_diff"]), _num(c["max_abs_diff"])]
                 for c in cmp["changed"]]
    else:
        rows = [["changed tensors", "count", "min ‖ΔW‖/‖W‖", "max ‖ΔW‖/‖W‖"]]
        groups: dict[str, list[float]] = {}
        for c in cmp["changed"]:
            rel = c["rel_diff"] if c["rel_diff"] is not None else math.inf
            groups.setdefault(_LAYER.sub("*", c["name"]), []).append(rel)
        rows += [[k, f"×{len(v)}", _num(min(v)), _num(max(v))] for k, v in groups.items()]
    lines += _table(rows, right={2, 3})
    return "\n".join(lines)


def format_extract(r: dict[str, Any], expand: bool = False) -> str:
    """The human view of an extract report: per (folded) module rank and errors, totals."""
    t = r["totals"]
    lines = [f"wrote {r['output']}: {r['format']} adapter, {t['lora_modules']} LoRA modules, "
             f"{len(r['full_tensors'])} full tensors, {t['parameters']:,} parameters "
             f"({human_bytes(t['bytes'])}); {r['policy']}, {r['svd']} SVD, seed {r['seed']}, "
             f"{r['seconds']:.2f} s on {r['device']}"]
    rows = [["module", "count", "rank", "rel. error", "kept energy", "‖ΔW‖/‖W‖"]]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for m in r["modules"]:
        groups.setdefault((_LAYER.sub("*", m["name"]), m["rank"] if expand else None),
                          []).append(m)
    for (name, _), ms in groups.items():
        ranks = sorted({m["rank"] for m in ms})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        rows.append([ms[0]["name"] if len(ms) == 1 else name, f"×{len(ms)}" if len(ms) > 1
                     else "", rank, _num(max(m["rel_error"] for m in ms)),
                     f"{min(m['kept_energy'] for m in ms):.4f}",
                     _num(max(m["rel_delta"] or 0.0 for m in ms))])
    if len(rows) > 1:
        lines.append("")
        lines += _table(rows, right={1, 2, 3, 4, 5})
        lines.append("(per group: largest error, smallest kept energy, largest ‖ΔW‖/‖W‖)")
    lines.append("")
    lines.append(f"error ‖ΔW − BA‖/‖ΔW‖ measured on the stored factors: max "
                 f"{t['max_rel_error']:.4g}, over all modules {t['total_rel_error']:.4g}")
    if r["full_tensors"]:
        lines.append(f"stored in full (modules_to_save): {', '.join(r['full_tensors'][:6])}"
                     + (" …" if len(r["full_tensors"]) > 6 else "")
                     + " — not LoRA-able; --skip-full drops norms")
    if r["bias_deltas"]:
        lines.append(f"bias changes as lora_B.bias: {len(r['bias_deltas'])}")
    if r["dropped"]:
        lines.append(f"dropped (--skip-full): {', '.join(r['dropped'][:6])}")
    lines.append(f"unchanged tensors skipped: {r['unchanged_tensors']}")
    return "\n".join(lines)
