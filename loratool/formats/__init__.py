"""Adapter formats: a registry of format modules, and detection by content.

Each format module (``peft``, ``kohya``, ``diffusers``, ``gguf``) declares a ``FORMAT``
(``base.Format``): how to recognise, read and write it and what it cannot hold; this module
looks them up. ``detect`` reads tensor names, header metadata and configs, never file names
alone; ``read_any`` reads any supported adapter into the one in-memory model; ``write_adapter``
writes it in a chosen format, refusing what the format cannot hold.

Example::
    ad = read_adapter("my-lora.safetensors")
    write_adapter(ad, Path("peft-adapter"), "peft")
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import torch

from ..errors import FormatError, UsageError
from ..formats import diffusers, gguf, kohya, peft
from ..formats.base import Format
from ..headers.adapters import check_one_format, detect
from ..headers.checkpoint import Checkpoint
from ..headers.kohya import KIND_NAMES
from ..headers.peft_tuners import TUNER_NAMES
from ..headers.sources import resolve_input
from ..io.tensors import open_checkpoint
from ..model.tuners import TunerModule
from ..options import Options

if TYPE_CHECKING:
    from ..model.adapter import LoraAdapter

REGISTRY: dict[str, Format] = {f.name: f for f in (peft.FORMAT, kohya.FORMAT, diffusers.FORMAT,
                                                   gguf.FORMAT)}


FORMATS = tuple(REGISTRY)
_NEVER_WRITTEN = (".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx")


def output_format(out: Path, fmt: str | None, default: str, allowed: tuple[str, ...]) -> str:
    """The format to write: ``fmt`` when given, else the one the output's suffix names
    (``x.gguf``, ``x.safetensors``), else ``default``. A suffix that contradicts ``fmt`` is
    refused rather than turned into a folder named like a file."""
    suffix = Path(out).suffix.lower()
    if suffix in _NEVER_WRITTEN:
        raise UsageError(f"-o {out}: loratool writes adapters as safetensors or GGUF, not "
                         f"{suffix}; name a folder, a .safetensors or a .gguf file")
    named = tuple(f.name for f in REGISTRY.values() if f.suffix and f.suffix == suffix)
    fits = tuple(f for f in named if f in allowed)
    if fmt is None:
        fmt = fits[0] if fits and default not in fits else default
    if fmt not in allowed:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(allowed)}")
    if named and fmt not in named:
        other = f" or --format {fits[0]}" if fits else ""
        raise UsageError(f"-o {out} names a {suffix} file, but --format {fmt} writes "
                         f"{REGISTRY[fmt].writes}: drop the suffix{other}")
    return fmt


def read_any(spec: str, base: str | None = None) -> LoraAdapter:
    """Read an adapter of any supported format into a LoraAdapter (``base``, a path or Hub id,
    resolves kohya names that cannot be mapped back alone)."""

    target = resolve_input(spec)
    if isinstance(target, Path):
        if target.is_dir():
            check_one_format(target)
    return read_checkpoint(open_checkpoint(spec), base)


read_adapter = read_any


def read_checkpoint(ckpt: Checkpoint, base: str | None = None) -> LoraAdapter:
    """Read an already opened adapter checkpoint into a LoraAdapter."""
    spec = ckpt.source or str(ckpt.path)
    kind, fmt = detect(ckpt)
    if kind != "adapter":
        raise FormatError(f"{spec}: is a model checkpoint, not an adapter (no lora_A/lora_B or "
                          "lora_down/lora_up tensors); to make an adapter from a fine-tune use "
                          "`loratool extract`")
    reader = REGISTRY[fmt].read
    assert reader is not None
    ad = reader(ckpt, base)
    if not ad.modules and not ad.full and not ad.lyco:
        raise FormatError(f"{spec}: holds no LoRA modules and no full tensors: there is "
                          "nothing in it to apply")
    return ad


def lyco_message(ad: LoraAdapter, why: str, how: str = "") -> str:
    """The one line for modules that are not LoRA (LyCORIS', or PEFT's other tuners) where a
    step cannot take them: what they are, and how to turn them into LoRA."""

    # PEFT's own (its LoHa and LoKr carry PEFT's r): convert writes PEFT LoRA for them
    tuners = any(isinstance(m, TunerModule) or m.dim is not None for m in ad.lyco.values())
    kinds = Counter({**KIND_NAMES, **TUNER_NAMES}[m.kind] for m in ad.lyco.values())
    what = ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items()))
    to = "peft" if tuners else "kohya"
    how = how or ("turn them into LoRA at a rank policy with `loratool convert ADAPTER --to "
                  f"{to} --max-error 0.01 --base BASE -o OUT` (or --rank N, --energy F, "
                  "--budget SIZE)")
    label = "PEFT tuner modules" if tuners else "LyCORIS modules"
    return f"the adapter holds {label} ({what}); {why}: {how}"


def require_lora(ad: LoraAdapter, spec: str, why: str) -> None:
    """Refuse LyCORIS modules where a step works on LoRA factors only; ``why`` says so in a
    whole clause ("combine works on LoRA factors")."""
    if ad.lyco:
        raise FormatError(f"{spec}: " + lyco_message(ad, why))


def require_resolved(ad: LoraAdapter, spec: str) -> None:
    """kohya names read without --base stay underscored; nothing but kohya can use them."""
    if ad.unresolved:
        raise FormatError(f"{spec}: kohya names like {ad.unresolved[0]} cannot be mapped back "
                          "to module paths without the base model (dots and underscores are "
                          "ambiguous); pass --base BASE")


def lossy(ad: LoraAdapter, fmt: str) -> list[str]:
    """What ``fmt`` cannot hold of ``ad``: one phrase per kind of loss."""
    return REGISTRY[fmt].lossy(ad)


def drop_unsupported(ad: LoraAdapter, fmt: str) -> LoraAdapter:
    """A copy of ``ad`` without what ``fmt`` cannot hold (only when the user asked)."""
    return REGISTRY[fmt].keep(ad)


def drop_base_copies(ad: LoraAdapter, base: Checkpoint) -> list[str]:
    """Remove the full tensors that equal the base's own (PEFT saves ``base_layer.weight``
    copies of adapted embeddings and heads); they change nothing when merged, and formats
    without full tensors (kohya, GGUF) can then hold the adapter. Returns their names."""

    same = []
    for name, t in list(ad.full.items()):
        info = base.tensors.get(name)
        if info is not None and tuple(info.shape) == tuple(t.shape) and torch.equal(
                base.load(name, dtype=t.dtype), t):
            del ad.full[name]
            same.append(name)
    return same


@overload
def write_adapter(ad: LoraAdapter, out: Path, fmt: str, *, base: str | None = ...,
                  force: bool = ..., inputs: list[Path] | None = ..., note: str = ...,
                  with_info: Literal[False] = ..., options: Options | None = ...) -> str: ...


@overload
def write_adapter(ad: LoraAdapter, out: Path, fmt: str, *, base: str | None = ...,
                  force: bool = ..., inputs: list[Path] | None = ..., note: str = ...,
                  with_info: Literal[True], options: Options | None = ...
                  ) -> tuple[str, dict[str, object] | None]: ...


def write_adapter(ad: LoraAdapter, out: Path, fmt: str, *, base: str | None = None,
                  force: bool = False, inputs: list[Path] | None = None, note: str = "",
                  with_info: bool = False, options: Options | None = None
                  ) -> str | tuple[str, dict[str, object] | None]:
    """Write ``ad`` in ``fmt`` (refusing what the format cannot hold); the output path (and,
    with ``with_info``, what the writer reports, such as GGUF's alpha)."""
    if ad.lyco:
        raise FormatError(lyco_message(ad, f"a {fmt} LoRA cannot hold them as they are"))
    if ad.naming == "gguf" and fmt != "gguf":
        raise FormatError(f"the adapter's modules have llama.cpp's tensor names (such as "
                          f"{next(iter(ad.modules), 'blk.0.attn_q')}); {fmt} needs the "
                          "transformers module names: pass --base with the transformers model "
                          "folder (config.json) the adapter is for")
    lost = lossy(ad, fmt)
    if lost:
        raise FormatError(f"{fmt} cannot hold {'; '.join(lost)}; choose another format")
    path, info = REGISTRY[fmt].write(ad, out, force=force, inputs=inputs, note=note, base=base,
                                     options=options)
    return (str(path), info) if with_info else str(path)
