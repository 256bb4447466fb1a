"""Reports for ``analyze``: the spectrum table with sparklines, effective ranks and the
subspace similarity of two adapters, from the report :mod:`analyze` returns."""

from __future__ import annotations

from typing import Any

from ..reports.render import _num, _ranks, _table

_BARS = "▁▂▃▄▅▆▇█"


def _g(x: float | None) -> str:
    """A ratio in 3 significant digits; n/a where it has no value."""
    return "n/a" if x is None else f"{x:.3g}"


def spark(values: list[float], width: int = 16, top: float | None = None) -> str:
    """A small bar per value, scaled to ``top`` (default the largest: a spectrum's σᵢ/σ₁)."""
    top = max(values[:width], default=0.0) if top is None else top
    if top <= 0:
        return ""
    return "".join(_BARS[min(7, max(0, round(7 * v / top)))] for v in values[:width])


def format_analyze(r: dict[str, Any]) -> str:
    """The compact table per module of an analyze report, and the extract it suggests."""
    if r["mode"] == "compare":
        return _format_compare_adapters(r)
    es = r["energies"]
    what = (f"{r['tuned']} against {r['base']}" if r["mode"] == "finetune"
            else f"adapter {r['adapter']}")
    head = f"{what}: {len(r['modules'])} modules; {r['seconds']:.2f} s"
    rows = [["module"] + (["rank"] if r["mode"] == "adapter" else []) + ["‖ΔW‖/‖W‖"]
            + [f"r{100 * e:g}%" for e in es] + ["amp (random)", "spectrum"]]
    for m in r["modules"]:
        amp = m.get("amplification")
        rows.append([m["name"]] + ([str(m["rank"])] if r["mode"] == "adapter" else [])
                    + [_num(m.get("rel_delta"))]
                    + [_rank(m["effective_rank"][f"{e:g}"], m["computed"]) for e in es]
                    + [f"{_g(amp['factor'])} ({_g(amp['random'])}) @{amp['rank']}" if amp
                       else "-", spark(m["singular_values"])])
    lines = [head, ""] + _table(rows, right=set(range(1, len(rows[0]) - 1)))
    lines.append(f"(r{100 * es[0]:g}% …: the rank that keeps that share of ‖ΔW‖²; amp: "
                 "‖ΔW‖/‖UᵀWV‖ for ΔW's top directions, beside as many random ones)")
    if r["mode"] == "finetune" and r["other_changed"]:
        lines.append(f"also changed, not matrices: {len(r['other_changed'])} tensors (norms, "
                     "biases, routers)")
    s = r.get("suggest")
    if s:
        lines.append(f"to keep {100 * s['energy']:g} % of every ΔW: {s['command']}   # ranks "
                     f"{_ranks(s['ranks'])}" + (f", {s['parameters']:,} parameters in the factors"
                                               if s["parameters"] is not None else ""))
    return "\n".join(lines)


def _rank(r: int | None, computed: int) -> str:
    return str(r) if r is not None else f">{computed}"


def _format_compare_adapters(r: dict[str, Any]) -> str:
    rows = [["module", "ranks", "φ(1,1)", "φ(k,k)", "φ(i,i), i = 1…k"]]
    for m in r["modules"]:
        d = m["phi_diagonal"]
        rows.append([m["name"], "/".join(map(str, m["ranks"])), f"{d[0]:.3f}",
                     f"{m['phi_min_rank']:.3f}", spark(d, 32, top=1.0)])
    lines = [f"{' and '.join(r['adapters'])}: {len(r['modules'])} modules in both; "
             f"{r['seconds']:.2f} s", ""] + _table(rows, right={1, 2, 3})
    of = ("the A factors' right-singular vectors" if r["subspace"] == "a"
          else "ΔW's right-singular vectors")
    lines.append(f"(φ(i, j) = ‖V₁[:i]·V₂[:j]ᵀ‖² / min(i, j) of {of}: 1 where one subspace "
                 "holds the other, j/d for random ones (d inputs); k = the smaller rank)")
    for key, label in (("only_in_first", "only in the first"),
                       ("only_in_second", "only in the second"),
                       ("changes_nothing", "not compared, as they change nothing in one "
                                           "adapter (a factor all zero)")):
        if r.get(key):
            lines.append(f"{len(r[key])} modules {label}: {', '.join(r[key][:4])}"
                         + (" …" if len(r[key]) > 4 else ""))
    return "\n".join(lines)
