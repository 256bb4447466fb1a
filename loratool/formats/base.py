"""What a format module declares, so that ``formats/__init__.py`` is a table lookup: adding a
format is one new file and one line in the registry.

Example::
    FORMAT = Format(name="kohya", writes="one .safetensors file", suffix=".safetensors",
                    default_file="lora.safetensors", claims=claims, read=read, write=write,
                    lossy=lossy, keep=keep)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ..model.adapter import LoraAdapter, LoraModule

if TYPE_CHECKING:
    from ..headers.checkpoint import Checkpoint
    from ..options import Options


class Writer(Protocol):
    """write(ad, out, *, force, inputs, note, base, options) → (the path written, details or
    None)."""

    def __call__(self, ad: LoraAdapter, out: Path, *, force: bool = ...,
                 inputs: list[Path] | None = ..., note: str = ..., base: str | None = ...,
                 options: Options | None = ...) -> tuple[Path, dict[str, object] | None]: ...


@dataclass(frozen=True)
class Format:
    """One adapter format: how to recognise, read and write it, and what it cannot hold."""

    name: str
    writes: str  # what -o becomes, for messages: "one .gguf file"
    suffix: str | None  # the file suffix of a single-file output; None: always a folder
    default_file: str | None  # the file written inside a folder -o (None: several files)
    claims: Callable[[Checkpoint], bool] | None  # is it this format? None: write-only
    read: Callable[[Checkpoint, str | None], LoraAdapter] | None  # (checkpoint, base)
    write: Writer
    # what it cannot hold of an adapter: one phrase a kind
    lossy: Callable[[LoraAdapter], list[str]]
    keep: Callable[[LoraAdapter], LoraAdapter]  # a copy of an adapter without what it cannot hold


def held(ad: LoraAdapter, *, full: bool = True, bias: bool = True, magnitude: bool = True,
         layouts: tuple[str, ...] = ("linear", "fan_in_fan_out", "embedding", "conv")
         ) -> LoraAdapter:
    """A copy of ``ad`` with only what a format holds (for ``keep``)."""
    out = copy.copy(ad)
    out.full = dict(ad.full) if full else {}
    out.modules = {}
    for k, m in ad.modules.items():
        if m.layout not in layouts:
            continue
        m = copy.copy(m)
        m.bias = m.bias if bias else None
        m.magnitude = m.magnitude if magnitude else None
        out.modules[k] = m
    return out


def losses(ad: LoraAdapter, checks: list[tuple[str, Callable[[LoraModule], bool]]],
           full: bool = False) -> list[str]:
    """One phrase per kind of module a format cannot hold (and its full tensors)."""
    out = []
    for label, pred in checks:
        hit = [m.key for m in ad.modules.values() if pred(m)]
        if hit:
            out.append(f"{label} on {len(hit)} modules ({hit[0]} …)")
    if full and ad.full:
        out.append(f"{len(ad.full)} full tensors (modules_to_save)")
    return out
