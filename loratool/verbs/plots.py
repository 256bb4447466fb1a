"""Pictures of an ``analyze`` report: PNGs (matplotlib, the optional extra
``loratool[plot]``) and one self-contained HTML page that embeds them.

- spectra: σᵢ/σ₁ of every module on one figure per layer type (``layers.*.q_proj``);
- errors: the Eckart–Young error ‖ΔW − ΔW_r‖/‖ΔW‖ against r, the chosen rank marked;
- similarity: φ(i, j) heat maps of two adapters, as the LoRA paper's Figures 3 and 4.

Example::
    images = figures(report)            # {"spectra-layers.x.q_proj.png": b"…", …}
    page = html_page(report, images, report.render())
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Mapping, cast

from ..errors import LoraToolError
from ..io.staging import HTML_OUTPUT, PLOTS_OUTPUT, Stage, check_output, output_os_error
from ..options import Options
from ..reports.analyze import Analysis, CompareAnalysis, FinetuneAnalysis, PlotsWritten, Written
from ..reports.base import JsonValue, Report

if TYPE_CHECKING:  # matplotlib is an optional extra: imported only to draw
    from matplotlib.figure import Figure

EXTRA = "pip install 'loratool[plot]'"
_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass
class _Drawn:
    """What the figures show of one module: its spectrum and error curve with the rank marked
    on it, or the φ grid of two adapters."""

    name: str
    singular_values: list[float] = field(default_factory=list)
    error_curve: list[float] = field(default_factory=list)
    marked: int | None = None  # the rank dotted on the error curve
    phi: list[list[float]] = field(default_factory=list)


def _drawn(report: Analysis | Mapping[str, JsonValue]) -> tuple[bool, list[_Drawn]]:
    """Whether the report compares two adapters, and what to draw of each module; from the
    report, or from its JSON (``--json`` read back; keys a figure does not need may be
    missing)."""
    if isinstance(report, CompareAnalysis):
        return True, [_Drawn(m.name, phi=m.phi) for m in report.modules]
    if isinstance(report, Report):
        e = f"{report.energies[len(report.energies) // 2]:g}"
        return False, [_Drawn(m.name, m.singular_values, m.error_curve,
                              (m.amplification.rank if m.amplification else None)
                              or m.effective_rank.get(e)) for m in report.modules]
    modules = cast("list[dict[str, JsonValue]]", report["modules"])
    if report["mode"] == "compare":
        return True, [_Drawn(str(m["name"]), phi=cast("list[list[float]]", m["phi"]))
                      for m in modules]
    energies = cast("list[float]", report["energies"])
    e = f"{energies[len(energies) // 2]:g}"
    out = []
    for m in modules:
        amp = cast("dict[str, int]", m.get("amplification") or {})
        ranks = cast("dict[str, int | None]", m["effective_rank"])
        out.append(_Drawn(str(m["name"]), cast("list[float]", m["singular_values"]),
                          cast("list[float]", m["error_curve"]),
                          amp.get("rank") or ranks.get(e)))
    return False, out


def _pyplot() -> ModuleType:
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


def _groups(modules: list[_Drawn]) -> dict[str, list[_Drawn]]:
    groups: dict[str, list[_Drawn]] = {}
    for m in modules:
        groups.setdefault(_LAYER.sub("*", m.name), []).append(m)
    return groups


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _file(kind: str, group: str) -> str:
    """The PNG's name: the group with ``N`` for the layer number (``layers.N.q_proj``), and
    nothing a shell or another file system would trip on."""
    name = group.replace("*", "N")
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}.png"


def figures(report: Analysis | Mapping[str, JsonValue]) -> dict[str, bytes]:
    """Every picture of the report (or of its JSON), by file name."""
    plt = _pyplot()
    compare, modules = _drawn(report)
    out: dict[str, bytes] = {}
    try:
        for group, ms in _groups(modules).items():
            if compare:
                out[_file("similarity", group)] = _similarity(plt, group, ms)
            else:
                out[_file("spectra", group)] = _spectra(plt, group, ms)
                out[_file("errors", group)] = _errors(plt, group, ms)
    finally:
        plt.close("all")
    return out


def _label(m: _Drawn, many: bool) -> str:
    found = _LAYER.search(m.name)
    return f"layer {found.group()}" if many and found else m.name


def _spectra(plt: ModuleType, group: str, ms: list[_Drawn]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    zeros = 0
    for m in ms:
        s = m.singular_values
        if s and s[0] > 0:  # a log axis cannot show σ = 0: those points are counted instead
            pts = [(i, x / s[0]) for i, x in enumerate(s, 1) if x > 0]
            zeros += len(s) - len(pts)
            ax.semilogy([i for i, _ in pts], [y for _, y in pts], lw=1,
                        marker="o" if len(s) <= 32 else None, ms=3,
                        label=_label(m, len(ms) > 1))
    note = f"\n({zeros} singular values of 0 not shown)" if zeros else ""
    ax.set(title=f"spectrum of ΔW: {group}{note}", xlabel="i", ylabel="σᵢ / σ₁")
    longest = max((len(m.singular_values) for m in ms), default=1)
    ax.set_xlim(0.5, longest + 0.5)  # whole indices, even for one or two values
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    if len(ms) <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def _errors(plt: ModuleType, group: str, ms: list[_Drawn]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for m in ms:
        curve = m.error_curve
        line, = ax.plot(range(len(curve)), curve, lw=1, label=_label(m, len(ms) > 1))
        r = m.marked
        if r is not None and r < len(curve):
            ax.plot([r], [curve[r]], "o", color=line.get_color(), ms=4)
    ax.set(title=f"error of the best rank r: {group}\n(dots: the rank chosen)", xlabel="rank r",
           ylabel="‖ΔW − ΔW_r‖ / ‖ΔW‖", ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if len(ms) <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def _similarity(plt: ModuleType, group: str, ms: list[_Drawn]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    shown = ms if len(ms) <= 4 else [ms[0], ms[len(ms) // 3], ms[2 * len(ms) // 3], ms[-1]]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False,
                             constrained_layout=True)
    for n, (ax, m) in enumerate(zip(axes[0], shown)):
        # aspect "auto": a rank-8 against rank-64 grid stays readable, as in the paper's figures
        im = ax.imshow(m.phi, vmin=0, vmax=1, origin="lower", cmap="viridis", aspect="auto",
                       extent=(0.5, len(m.phi[0]) + 0.5, 0.5, len(m.phi) + 0.5))
        ax.set(title=_label(m, True), xlabel="j (second)", ylabel="" if n else "i (first)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="φ(i, j)")
    which = "" if len(shown) == len(ms) else (
        f" ({', '.join(_label(m, True).removeprefix('layer ') for m in shown)} of "
        f"{len(ms)} shown; --json has every one)")
    fig.suptitle(f"subspace similarity: {group}{which}")
    return _png(fig)


def html_page(report: Analysis, images: dict[str, bytes], table: str) -> str:
    """One page with everything in it (images as data URIs): nothing it refers to can go
    missing, and it opens offline."""
    title = (f"{report.tuned} against {report.base}" if isinstance(report, FinetuneAnalysis)
             else " and ".join(report.adapters) if isinstance(report, CompareAnalysis)
             else f"adapter {report.adapter}")
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


def write(report: Analysis, plot: Path | None, page: Path | None, table: str,
          inputs: list[Path], force: bool, options: Options | None = None) -> Written:
    """``--plot DIR`` (one PNG a figure) and ``--html FILE`` (``table``, the report's text,
    above the figures), each written whole or not at all; the files written."""

    written = Written()
    where = plot or page
    if where is None:
        return written
    images = figures(report)
    try:
        if plot is not None:
            with Stage(plot, inputs, force, kind=PLOTS_OUTPUT, options=options) as stage:
                folder = stage.tmp
                assert folder is not None  # a folder output is staged in a folder
                for name, png in images.items():
                    (folder / name).write_bytes(png)
                stage.publish()
            written.plot = PlotsWritten(folder=str(plot), files=sorted(images))
        if page is not None:
            with Stage(page, inputs, force, file=page.name, kind=HTML_OUTPUT,
                       options=options) as stage:
                folder = stage.tmp
                assert folder is not None
                (folder / page.name).write_text(html_page(report, images, table),
                                                encoding="utf-8")
                stage.publish()
            written.html = str(page)
    except OSError as e:
        raise output_os_error(where, e) from e
    return written
