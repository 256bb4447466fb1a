"""``loratool convert``: any adapter format to any other, lossless or refused.

Reads with the format readers into the one ``LoraAdapter`` model and writes with the target's
writer. What the target cannot hold is named and refused, unless ``drop`` says to drop it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FormatError


def _local(spec: str | None) -> list[Path]:
    return [Path(spec)] if spec and Path(spec).exists() else []


def convert(spec: str, out: Path, to: str, base: str | None = None, force: bool = False,
            drop: bool = False) -> dict[str, Any]:
    """Convert ``spec`` to format ``to`` in ``out``; returns a report for the CLI.

    Example: ``convert("adapter/", Path("lora.safetensors"), "kohya")``.
    """
    from .adapter import match_base
    from .formats import (FORMATS, drop_base_copies, drop_unsupported, lossy, output_format,
                          read_any, require_resolved, write_adapter)

    to = output_format(out, to, to, FORMATS)  # refuses -o x.safetensors for PEFT and the like
    ad = read_any(spec, base)
    if to != "kohya":
        require_resolved(ad, spec)
    base_ckpt = None
    same: list[str] = []
    if base:
        from .checkpoint import open_checkpoint

        base_ckpt = open_checkpoint(base)
        same = drop_base_copies(ad, base_ckpt)
    lost = lossy(ad, to)
    if lost and not drop:
        raise FormatError(f"converting to {to} would lose {'; '.join(lost)}; pass "
                          "--drop-unsupported to write the rest without them")
    if lost:
        ad = drop_unsupported(ad, to)
    if not ad.modules:
        raise FormatError(f"{spec}: no LoRA modules left to write")
    if base_ckpt is not None and to != "kohya" and ad.components in ([None],):
        match_base(ad, base_ckpt)  # the adapter must fit the base it is for
    inputs = _local(spec) + _local(base)
    report: dict[str, Any] = {"input": spec, "source_format": ad.source_format, "format": to,
                              "modules": len(ad.modules), "full_tensors": len(ad.full),
                              "dropped": lost, "base_copies_left_out": same}
    note = f"Converted by loratool from a {ad.source_format} adapter."
    out_path, info = write_adapter(ad, out, to, base=base, force=force, inputs=inputs, note=note,
                                   with_info=True)
    report["output"] = out_path
    if info:
        report["gguf"] = info
    return report
