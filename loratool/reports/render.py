"""Reports for people: every table and summary the commands print, from the plain result
objects the verbs return (``--json`` prints those objects as they are). Nothing here prints.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from ..units import human_bytes

_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")


def _cell(text: str) -> str:
    """A table cell on one line, whatever a name holds."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    rows = [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c])
                 for c in range(len(r))]
        out.append("  ".join(cells).rstrip())
    return out


def _shape(s: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _span(values: list[float], fmt: str) -> str:
    """One value, or the smallest and largest: ``0.5–2``."""
    lo, hi = format(values[0], fmt), format(values[-1], fmt)
    return lo if lo == hi else f"{lo}–{hi}"


_KIND = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full"}


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in sorted(c.items()))


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3e}"


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


# --------------------------------------------------------------------------- writing verbs


def format_merge(r: dict[str, Any]) -> str:
    """merge / unmerge."""
    if r.get("format") == "gguf":
        return _format_merge_gguf(r)
    if r.get("pipeline"):
        names = ", ".join(f"{a['adapter']}×{a['weight']:g}" for a in r["adapters"])
        return "\n".join([f"wrote {r['output']}: a pipeline, {names} into {r['base']}; "
                          f"{r['seconds']:.2f} s; carried over as they are: "
                          f"{', '.join(r['carried_over']) or 'nothing'}"] +
                         [f"  {c}: " + format_merge(cr).split(": ", 1)[1].replace("\n", "\n  ")
                          for c, cr in r["components"].items()])
    names = ", ".join(f"{a['adapter']}×{a['weight']:g}" for a in r["adapters"])
    how = "into" if r["operation"] == "merge" else "from"
    lines = [f"wrote {r['output']}: {r['operation']}d {names} {how} {r['base']}",
             f"  {r['tensors_changed']} of {r['tensors']} tensors changed, max "
             f"|ΔW| {r['max_abs_delta']:.3g}; {r['seconds']:.2f} s, "
             f"{_rate(r['gb_per_s'])} while streaming on {r['device']}, peak RSS "
             + (f"{r['peak_rss_mb']:.0f} MiB" if r["peak_rss_mb"] is not None else "n/a")
             + (f", peak GPU {r['peak_gpu_mb']:.0f} MiB" if "peak_gpu_mb" in r else "")]
    kept = [f"{n} tensors replaced in full" for n in [r["replaced_recorded"]] if n] + [
        f"DoRA row norms of {n} tensors" for n in [r["dora_norms_recorded"]] if n]
    if kept:
        lines.append(f"  recorded {' and '.join(kept)} in {r['record']}, so that unmerge "
                     "gives the base back")
    lines += _inert(r)
    if r["not_copied"]:
        left = r["not_copied"]
        lines.append(f"  left out {len(left)} file(s) of the base that hold its old weights in "
                     f"another format: {', '.join(left[:4])}" + (" …" if len(left) > 4 else ""))
    v = r.get("verify")
    if v:
        lines.append(f"  verify: {v['checked']} changed tensors within the rounding bound; "
                     f"worst {v['name']} at {v['ratio']:.3f}× the bound (max error "
                     f"{v['max_abs_error']:.3g})")
    return "\n".join(lines)


def _rate(gb_per_s: float | None) -> str:
    """A throughput as a person reads it: MB/s below 1 GB/s."""
    if gb_per_s is None:
        return "n/a"
    return f"{gb_per_s:.2f} GB/s" if gb_per_s >= 1 else f"{gb_per_s * 1000:.0f} MB/s"


def _inert(r: dict[str, Any]) -> list[str]:
    """Modules left out of a merge because they change nothing."""
    inert = r.get("inert_modules") or []
    if not inert:
        return []
    return [f"  {len(inert)} module(s) change nothing (rank 0, or a factor all zero) and were "
            f"left out: {', '.join(inert[:3])}" + (" …" if len(inert) > 3 else "")]


def _format_merge_gguf(r: dict[str, Any]) -> str:
    """A merge into a GGUF model: what re-quantizing cost each changed tensor."""
    names = ", ".join(f"{a['adapter']}×{a['weight']:g}" for a in r["adapters"])
    lines = [f"wrote {r['output']}: merged {names} into {r['base']} (GGUF)",
             f"  {len(r['changed'])} of {r['tensors']} tensors changed and re-quantized, "
             f"{r['unchanged_copied']} copied byte for byte; {r['seconds']:.2f} s"]
    lines += _inert(r)
    if r["changed"]:
        rows = [["tensor", "type", "written", "‖ΔW‖/‖W‖", "quant. error / ‖W′‖",
                 "quant. error / ‖ΔW‖"]]
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for c in r["changed"]:
            groups.setdefault((_LAYER.sub("*", c["name"]), c["type"], c["written_as"]),
                              []).append(c)
        for (name, t, w), cs in groups.items():
            rows.append([name + (f" ×{len(cs)}" if len(cs) > 1 else ""), t, w,
                         _num(max(c["change"] for c in cs)),
                         _num(max(c["rel_error"] for c in cs)),
                         _num(max(c["error_vs_change"] for c in cs))])
        lines += [""] + ["  " + x for x in _table(rows, right={3, 4, 5})]
        lines.append("  (largest per group; the last column is the quantization noise against "
                     "the adapter's change: near or above 1, the quantization hides the change)")
    v = r.get("verify")
    if v:
        lines.append(f"  verify: the written file read back; {v['tensors_checked']} tensors "
                     "where planned, their bytes as computed or copied")
    return "\n".join(lines)


def format_combine(r: dict[str, Any], expand: bool = False) -> str:
    """combine / resize: totals, then rank and measured error per (folded) module."""
    t = r["totals"]
    resize = r["operation"] == "resize"
    what = (f"ranks {_ranks(t['input_ranks'])} → {_ranks(t['ranks'])}" if resize else
            f"method {r['method']}, ranks {_ranks(t['ranks'])}")
    lines = [f"wrote {r['output']}: {r['format']} adapter, {t['lora_modules']} LoRA modules, "
             f"{what}, {t['parameters']:,} parameters ({human_bytes(t['bytes'])})"
             + (f"; {r['policy']}" if r["policy"] else "") + f"; {r['seconds']:.2f} s"]
    rows = [["module", "count", "rank", "rel. error"]]
    for name, ms in _fold(r["modules"], expand):
        ranks = sorted({m.get("rank", 0) for m in ms})
        rows.append([name, f"×{len(ms)}" if len(ms) > 1 else "", _ranks(ranks),
                     _num(max(m.get("rel_error") or 0.0 for m in ms))])
    if len(rows) > 1:
        lines += [""] + _table(rows, right={1, 2, 3})
    against = ("the input" if resize else "the exact weighted sum" if r["method"] in (
        "svd", "cat") else "the method's dense result")
    lines += ["", f"error ‖ΔW − BA‖/‖ΔW‖ against {against}, measured on the stored factors: "
                  f"max {t['max_rel_error']:.4g}"]
    return "\n".join(lines)


def format_convert(r: dict[str, Any]) -> str:
    lines = [f"wrote {r['output']}: {r['format']} adapter, {r['modules']} LoRA modules, "
             f"{r['full_tensors']} full tensors (from {r['source_format']})"]
    for lost in r["dropped"]:
        lines.append(f"  dropped (--drop-unsupported): {lost}")
    if r["base_copies_left_out"]:
        lines.append(f"  left out {len(r['base_copies_left_out'])} full tensor(s) equal to the "
                     f"base's ({r['base_copies_left_out'][0]} …): merging them changes nothing")
    if r.get("rank_0_left_out"):
        lines.append(f"  left out {len(r['rank_0_left_out'])} module(s) of rank 0 "
                     f"({r['rank_0_left_out'][0]} …): they change nothing")
    ly = r.get("lycoris")
    if ly:
        kinds = Counter(_KIND[m["type"]] for m in ly["modules"])
        lines.append(f"  {len(ly['modules'])} LyCORIS modules ({_counts(kinds)}) made LoRA at "
                     f"{ly['policy']}; largest relative error {ly['max_rel_error']:.4g}"
                     + ("; the 12 worst groups (--json lists all):" if len(ly["modules"]) > 12
                        else ""))
        groups = sorted(_fold(ly["modules"], False),  # the worst first
                        key=lambda g: -max(m["rel_error"] for m in g[1]))[:12]
        for name, ms in groups:
            lines.append(f"    {name}: {_KIND[ms[0]['type']]} → rank "
                         f"{_ranks(sorted({m['rank'] for m in ms}))}, error ≤ "
                         f"{max(m['rel_error'] for m in ms):.3g} (×{len(ms)})")
    g = r.get("gguf")
    if g and g["rescaled"]:
        lines.append(f"  adapter.lora.alpha = {g['alpha']:g}; lora_b of {g['rescaled']} "
                     "modules rescaled to share it"
                     + (f" ({len(g['inexact'])} by a factor that is not a power of two: one "
                        "rounding)" if g["inexact"] else " (exactly: powers of two)"))
    elif g:
        lines.append(f"  adapter.lora.alpha = {g['alpha']:g}: every module's scale is alpha / "
                     "rank, nothing rescaled")
    return "\n".join(lines)


def format_export(r: dict[str, Any]) -> str:
    v = r["verification"]
    how = (f"{len(r['adapters'])} adapter(s) merged "
           f"{'into the streamed weights' if r.get('streamed') else 'in memory'} "
           f"({r['tensors_changed_by_adapters']} tensors)" if not r.get("adapter_files") else
           f"LoRA inputs on {r['lora']['modules']} modules (rank {r['lora']['rank']}), "
           f"adapters: {', '.join(r['adapter_files'])}")
    lines = [f"wrote {r['output']}: {', '.join(r['files'])}",
             f"  {r['architecture']} ({r['task']}, {r['dtype']}, opset {r['opset']}), inputs "
             f"{', '.join(r['inputs'])}; {how}; {r['seconds']:.1f} s"]
    if (r.get("lora") or {}).get("outside_the_graph"):
        lines.append(f"  not in the graph (the output does not depend on them): "
                     f"{', '.join(r['lora']['outside_the_graph'])}")
    if v["checked"] and v.get("switches"):
        lines.append(f"  verified in one onnxruntime session, switching adapters per run: max "
                     f"|ONNX − PyTorch (merged)| {v['max_abs_diff']:.3g} ≤ {v['atol']:g} over "
                     f"the base and {len(v['switches']) - 1} adapter(s)")
    elif v["checked"]:
        lines.append(f"  verified in onnxruntime on shapes {v['shapes']} (one padded): max "
                     f"|ONNX − PyTorch| {v['max_abs_diff']:.3g} ≤ {v['atol']:g}")
    else:
        lines.append("  not verified (--no-verify)")
    if v.get("mode", "whole model") != "whole model":
        lines.append(f"  checked on {v['mode']}")
    past = r.get("with_past")
    if past and past["verification"]["checked"]:
        lines.append(f"  prefill.onnx + decode.onnx (KV cache): a prefill and one decode step "
                     f"match PyTorch's full-sequence logits to "
                     f"{past['verification']['max_abs_diff']:.3g}")
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "none"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


def _fold(modules: list[dict[str, Any]], expand: bool) -> list[tuple[str, list[Any]]]:
    """Modules grouped by name with layer numbers folded (``layers.*.q_proj``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in modules:
        groups.setdefault(m["name"] if expand else _LAYER.sub("*", m["name"]), []).append(m)
    return [(ms[0]["name"] if len(ms) == 1 else k, ms) for k, ms in groups.items()]


# --------------------------------------------------------------------------- analyze
