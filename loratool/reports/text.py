"""The pieces every report's text is made of: tables, numbers, ranges, shapes, and module names
folded over their layer numbers (``layers.*.q_proj``). Nothing here prints.

Example::

    "\\n".join(table([["module", "rank"], ["q_proj", "8"]], right={1}))
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence, TypeVar

LAYER = re.compile(r"(?<=\.)\d+(?=\.)")
KIND = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full", "adalora": "AdaLoRA",
        "ia3": "IA³", "vera": "VeRA", "oft": "OFT", "boft": "BOFT"}
T = TypeVar("T")


def cell(text: str) -> str:
    """A table cell on one line, whatever a name holds."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows as aligned text lines; the columns in ``right`` right-aligned."""
    rows = [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c])
                 for c in range(len(r))]
        out.append("  ".join(cells).rstrip())
    return out


def shape_text(s: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def num(x: float | None) -> str:
    """A measured number in 4 significant digits; n/a where there is none."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3e}"


def ratio(x: float | None) -> str:
    """A ratio in 3 significant digits; n/a where it has no value."""
    return "n/a" if x is None else f"{x:.3g}"


def ranks_text(ranks: Sequence[int]) -> str:
    """``8``, or ``4–16`` for several; ``none``."""
    if not ranks:
        return "none"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


def span(values: Sequence[float], fmt: str) -> str:
    """One value, or the smallest and largest: ``0.5–2``."""
    lo, hi = format(values[0], fmt), format(values[-1], fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in sorted(c.items()))


def rate(gb_per_s: float | None) -> str:
    """A throughput as a person reads it: MB/s below 1 GB/s."""
    if gb_per_s is None:
        return "n/a"
    return f"{gb_per_s:.2f} GB/s" if gb_per_s >= 1 else f"{gb_per_s * 1000:.0f} MB/s"


def fold(items: Sequence[T], name: Callable[[T], str], expand: bool = False
         ) -> list[tuple[str, list[T]]]:
    """Items grouped by name with layer numbers folded (``layers.*.q_proj``), in order; a
    group of one keeps its own name. ``expand``: every item on its own."""
    groups: dict[str, list[T]] = {}
    for it in items:
        groups.setdefault(name(it) if expand else LAYER.sub("*", name(it)), []).append(it)
    return [(name(ms[0]) if len(ms) == 1 else k, ms) for k, ms in groups.items()]


def listing(names: Sequence[str], shown: int = 4) -> str:
    """The first names, and an ellipsis when there are more."""
    return ", ".join(names[:shown]) + (" …" if len(names) > shown else "")
