"""Pictures of an ``analyze`` report: PNGs (matplotlib, the optional extra
``loratool[plot]``) and one self-contained HTML page that embeds them.

- spectra: σᵢ/σ₁ of every module on one figure per layer type (``layers.*.q_proj``);
- errors: the Eckart–Young error ‖ΔW − ΔW_r‖/‖ΔW‖ against r, the chosen rank marked;
- similarity: φ(i, j) heat maps of two adapters, as the LoRA paper's Figures 3 and 4.

Example::
    images = figures(report)            # {"spectra-layers.x.q_proj.png": b"…", …}
    page = html_page(report, images)
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import logging
import re
from pathlib import Path
from typing import Any

from ..errors import LoraToolError
from ..io.staging import HTML_OUTPUT, PLOTS_OUTPUT, Stage, check_output, output_os_error

EXTRA = "pip install 'loratool[plot]'"
_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")


def _pyplot() -> Any:
    # matplotlib logs two lines of warnings when its config folder is not writable (it then
    # uses a temporary one, which is fine for drawing a few files): only cli.py prints
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    try:
        import matplotlib
    except ImportError as e:
        raise LoraToolError(f"--plot and --html need matplotlib: {EXTRA}") from e
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _groups(modules: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in modules:
        groups.setdefault(_LAYER.sub("*", m["name"]), []).append(m)
    return groups


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _file(kind: str, group: str) -> str:
    """The PNG's name: the group with ``N`` for the layer number (``layers.N.q_proj``), and
    nothing a shell or another file system would trip on."""
    name = group.replace("*", "N")
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}.png"


def figures(report: dict[str, Any]) -> dict[str, bytes]:
    """Every picture of the report, by file name."""
    plt = _pyplot()
    out: dict[str, bytes] = {}
    try:
        for group, ms in _groups(report["modules"]).items():
            if report["mode"] == "compare":
                out[_file("similarity", group)] = _similarity(plt, group, ms)
            else:
                out[_file("spectra", group)] = _spectra(plt, group, ms)
                out[_file("errors", group)] = _errors(plt, group, ms, report)
    finally:
        plt.close("all")
    return out


def _label(m: dict[str, Any], many: bool) -> str:
    found = _LAYER.search(m["name"])
    return f"layer {found.group()}" if many and found else m["name"]


def _spectra(plt: Any, group: str, ms: list[dict[str, Any]]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    zeros = 0
    for m in ms:
        s = m["singular_values"]
        if s and s[0] > 0:  # a log axis cannot show σ = 0: those points are counted instead
            pts = [(i, x / s[0]) for i, x in enumerate(s, 1) if x > 0]
            zeros += len(s) - len(pts)
            ax.semilogy([i for i, _ in pts], [y for _, y in pts], lw=1,
                        marker="o" if len(s) <= 32 else None, ms=3,
                        label=_label(m, len(ms) > 1))
    note = f"\n({zeros} singular values of 0 not shown)" if zeros else ""
    ax.set(title=f"spectrum of ΔW: {group}{note}", xlabel="i", ylabel="σᵢ / σ₁")
    longest = max((len(m["singular_values"]) for m in ms), default=1)
    ax.set_xlim(0.5, longest + 0.5)  # whole indices, even for one or two values
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    if len(ms) <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def _errors(plt: Any, group: str, ms: list[dict[str, Any]], report: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    e = report["energies"][len(report["energies"]) // 2]
    for m in ms:
        curve = m["error_curve"]
        line, = ax.plot(range(len(curve)), curve, lw=1, label=_label(m, len(ms) > 1))
        r = (m.get("amplification") or {}).get("rank") or m["effective_rank"].get(f"{e:g}")
        if r is not None and r < len(curve):
            ax.plot([r], [curve[r]], "o", color=line.get_color(), ms=4)
    ax.set(title=f"error of the best rank r: {group}\n(dots: the rank chosen)", xlabel="rank r",
           ylabel="‖ΔW − ΔW_r‖ / ‖ΔW‖", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if len(ms) <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def _similarity(plt: Any, group: str, ms: list[dict[str, Any]]) -> bytes:
    shown = ms if len(ms) <= 4 else [ms[0], ms[len(ms) // 3], ms[2 * len(ms) // 3], ms[-1]]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False,
                             constrained_layout=True)
    from matplotlib.ticker import MaxNLocator

    for n, (ax, m) in enumerate(zip(axes[0], shown)):
        # aspect "auto": a rank-8 against rank-64 grid stays readable, as in the paper's figures
        im = ax.imshow(m["phi"], vmin=0, vmax=1, origin="lower", cmap="viridis", aspect="auto",
                       extent=(0.5, len(m["phi"][0]) + 0.5, 0.5, len(m["phi"]) + 0.5))
        ax.set(title=_label(m, True), xlabel="j (second)", ylabel="" if n else "i (first)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="φ(i, j)")
    which = "" if len(shown) == len(ms) else (
        f" ({', '.join(_label(m, True).removeprefix('layer ') for m in shown)} of "
        f"{len(ms)} shown; --json has every one)")
    fig.suptitle(f"subspace similarity: {group}{which}")
    return _png(fig)


def html_page(report: dict[str, Any], images: dict[str, bytes], table: str) -> str:
    """One page with everything in it (images as data URIs): nothing it refers to can go
    missing, and it opens offline."""
    mode = report["mode"]
    title = (f"{report.get('tuned')} against {report.get('base')}" if mode == "finetune" else
             f"adapter {report.get('adapter')}" if mode == "adapter" else
             " and ".join(report.get("adapters", [])))
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>loratool analyze: {html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}</style>",
             "</head><body>", f"<h1>loratool analyze: {html.escape(title)}</h1>",
             f"<pre>{html.escape(table)}</pre>"]
    for name, png in images.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(name[:-4])}</h2>"
                     f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def check_outputs(plot: Path | None, page: Path | None, inputs: list[Path],
                  force: bool) -> None:
    """Refuse unusable outputs before any work (and without matplotlib, say so now)."""

    if plot is None and page is None:
        return
    if importlib.util.find_spec("matplotlib") is None:  # said now, imported only to draw
        raise LoraToolError(f"--plot and --html need matplotlib: {EXTRA}")
    if plot is not None:
        check_output(plot, inputs, force, PLOTS_OUTPUT)
    if page is not None:
        check_output(page, inputs, force, HTML_OUTPUT)


def write(report: dict[str, Any], plot: Path | None, page: Path | None, table: str,
          inputs: list[Path], force: bool) -> dict[str, Any]:
    """``--plot DIR`` (one PNG a figure) and ``--html FILE``, each written whole or not at
    all; the files written."""

    images = figures(report)
    written: dict[str, Any] = {}
    try:
        if plot is not None:
            with Stage(plot, inputs, force, kind=PLOTS_OUTPUT) as stage:
                for name, png in images.items():
                    (stage.tmp / name).write_bytes(png)  # type: ignore[operator]
                stage.publish()
            written["plot"] = {"folder": str(plot), "files": sorted(images)}
        if page is not None:
            with Stage(page, inputs, force, file=page.name, kind=HTML_OUTPUT) as stage:
                (stage.tmp / page.name).write_text(  # type: ignore[operator]
                    html_page(report, images, table), encoding="utf-8")
                stage.publish()
            written["html"] = str(page)
    except OSError as e:
        raise output_os_error(plot or page, e) from e  # type: ignore[arg-type]
    return written
