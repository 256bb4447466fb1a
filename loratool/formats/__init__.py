"""Adapter formats: detection by content, and one reader and writer per format.

``detect`` looks at tensor names, header metadata and configs, never at file names alone.
``read_any`` reads any supported adapter into the one in-memory model (``LoraAdapter``);
``write_any`` writes it in a chosen format, refusing (or, when asked, dropping) what the target
format cannot hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import FormatError

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B",
                   ".lora_down.", ".lora_up.", ".lora_a", ".lora_b")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.",
                      "text_encoder_3.", "prior.", "decoder.")
FORMATS = ("peft", "kohya", "diffusers", "gguf")


def detect(ckpt: Checkpoint) -> tuple[str, str]:
    """``(kind, format)``: kind is ``model`` or ``adapter``; format names the layout.

    Example: ``detect(open_checkpoint("adapter/"))`` → ``("adapter", "peft")``.
    """
    names = list(ckpt.tensors)
    is_adapter = ckpt.adapter_config is not None or any(
        m in n for n in names for m in ADAPTER_MARKERS)
    if not is_adapter:
        return "model", ckpt.container
    kohya = any(n.startswith(KOHYA_PREFIXES) for n in names)
    peftish = any(".lora_A." in n or ".lora_embedding_A" in n for n in names)
    if kohya and peftish:
        raise FormatError(f"{ckpt.source or ckpt.path}: mixes kohya (lora_down/lora_up) and PEFT "
                          "(lora_A/lora_B) keys; split it into one file per format")
    if kohya:
        return "adapter", "kohya"
    if ckpt.adapter_config is None and ("lora_adapter_metadata" in ckpt.metadata or all(
            n.startswith(DIFFUSERS_PREFIXES) for n in names)):
        return "adapter", "diffusers"
    return "adapter", "peft"


# what each format writes as one file (else a folder of that file, or of PEFT's files)
_WRITES = {"peft": "a folder (adapter_config.json + adapter_model.safetensors)",
           "kohya": "one .safetensors file", "diffusers": "one .safetensors file",
           "gguf": "one .gguf file"}
_SUFFIX_FORMATS = {".gguf": ("gguf",), ".safetensors": ("kohya", "diffusers")}
_NEVER_WRITTEN = (".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx")


def output_format(out: Path, fmt: str | None, default: str, allowed: tuple[str, ...]) -> str:
    """The format to write: ``fmt`` when given, else the one the output's suffix names
    (``x.gguf``, ``x.safetensors``), else ``default``. A suffix that contradicts ``fmt`` is
    refused rather than turned into a folder named like a file."""
    from ..errors import UsageError

    suffix = Path(out).suffix.lower()
    if suffix in _NEVER_WRITTEN:
        raise UsageError(f"-o {out}: loratool writes adapters as safetensors or GGUF, not "
                         f"{suffix}; name a folder, a .safetensors or a .gguf file")
    fits = tuple(f for f in _SUFFIX_FORMATS.get(suffix, ()) if f in allowed)
    if fmt is None:
        fmt = fits[0] if fits and default not in fits else default
    if fmt not in allowed:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(allowed)}")
    if suffix in _SUFFIX_FORMATS and fmt not in _SUFFIX_FORMATS[suffix]:
        other = f" or --format {fits[0]}" if fits else ""
        raise UsageError(f"-o {out} names a {suffix} file, but --format {fmt} writes "
                         f"{_WRITES[fmt]}: drop the suffix{other}")
    return fmt


def _check_one_format(folder: Path) -> None:
    """A folder holding adapters of two formats is ambiguous: refuse rather than guess."""
    found = []
    names = set(os.listdir(folder))
    if "adapter_config.json" in names:
        found.append("PEFT (adapter_config.json)")
    if "pytorch_lora_weights.safetensors" in names:
        found.append("diffusers (pytorch_lora_weights.safetensors)")
    if any(n.endswith(".gguf") for n in names):
        found.append("GGUF (*.gguf)")
    if len(found) > 1:
        raise FormatError(f"{folder}: holds adapters of several formats ({'; '.join(found)}); "
                          "pass the file to read, or move the others out")


def base_resolver(base: str) -> Any:
    """A function (component, underscored name) → dotted module name, from a base's headers.

    ``base`` is a model folder, file or Hub id; a diffusers pipeline folder (model_index.json)
    resolves each component against its own subfolder.
    """
    from ..checkpoint import open_checkpoint
    from ..sources import resolve_input

    target = resolve_input(base)
    tables: dict[str | None, dict[str, str | None]] = {}

    def table(ckpt: Checkpoint) -> dict[str, str | None]:
        t: dict[str, str | None] = {}
        for n in ckpt.tensors:
            if n.endswith(".weight"):
                mod = n[: -len(".weight")]
                key = mod.replace(".", "_")
                t[key] = None if key in t and t[key] != mod else mod  # None: ambiguous
        return t

    pipeline = isinstance(target, Path) and (target / "model_index.json").is_file()
    transformers_model = False
    if pipeline:
        for sub in sorted(p.name for p in target.iterdir() if p.is_dir()):
            try:
                tables[sub] = table(open_checkpoint(target / sub))
            except FormatError:
                continue
            except Exception:  # not a weights folder (scheduler/, tokenizer/ …)
                continue
    else:
        ckpt = open_checkpoint(base)
        tables[None] = table(ckpt)
        # a transformers model has one name space: its modules get no pipeline component
        transformers_model = bool(ckpt.config and "model_type" in ckpt.config)

    def resolve(component: str | None, underscored: str) -> str | None:
        t = tables.get(component if pipeline else None)
        if t is None:
            raise FormatError(f"base {base} has no component {component}")
        if underscored in t and t[underscored] is None:
            raise FormatError(f"kohya name {underscored} matches several modules of {base}")
        return t.get(underscored)

    resolve.single_model = transformers_model  # type: ignore[attr-defined]
    return resolve


def read_any(spec: str, base: str | None = None) -> Any:
    """Read an adapter of any supported format into a LoraAdapter."""
    from ..checkpoint import open_checkpoint
    from ..sources import resolve_input

    target = resolve_input(spec)
    if isinstance(target, Path):
        if target.is_dir():
            _check_one_format(target)
        if target.suffix == ".gguf":
            raise FormatError(f"{spec}: reading GGUF adapters is not supported; convert from "
                              "the adapter the GGUF was made from")
    return read_checkpoint(open_checkpoint(spec), base)


def read_checkpoint(ckpt: Checkpoint, base: str | None = None) -> Any:
    """Read an already opened adapter checkpoint into a LoraAdapter."""
    from . import diffusers, kohya, peft

    spec = ckpt.source or str(ckpt.path)
    kind, fmt = detect(ckpt)
    if kind != "adapter":
        raise FormatError(f"{spec}: is a model checkpoint, not an adapter (no lora_A/lora_B or "
                          "lora_down/lora_up tensors); to make an adapter from a fine-tune use "
                          "`loratool extract`")
    if fmt == "kohya":
        ad = kohya.read(ckpt, base_resolver(base) if base else None)
    elif fmt == "diffusers":
        ad = diffusers.read(ckpt)
    else:
        ad = peft.read(ckpt)
    if not ad.modules and not ad.full:
        raise FormatError(f"{spec}: holds no LoRA modules and no full tensors: there is "
                          "nothing in it to apply")
    return ad


def require_resolved(ad: Any, spec: str) -> None:
    """kohya names read without --base stay underscored; nothing but kohya can use them."""
    unresolved = getattr(ad, "unresolved", None)
    if unresolved:
        raise FormatError(f"{spec}: kohya names like {unresolved[0]} cannot be mapped back to "
                          "module paths without the base model (dots and underscores are "
                          "ambiguous); pass --base BASE")


def lossy(ad: Any, fmt: str) -> list[str]:
    """What ``fmt`` cannot hold of ``ad``: one phrase per kind of loss."""
    from . import diffusers, gguf, kohya

    return {"peft": lambda a: [], "kohya": kohya.lossy, "diffusers": diffusers.lossy,
            "gguf": gguf.lossy}[fmt](ad)


def drop_unsupported(ad: Any, fmt: str) -> Any:
    """A copy of ``ad`` without what ``fmt`` cannot hold (only when the user asked)."""
    import copy

    out = copy.copy(ad)
    out.modules = {}
    out.full = {} if fmt in ("kohya", "diffusers", "gguf") else dict(ad.full)
    for k, m in ad.modules.items():
        m = copy.copy(m)
        if fmt == "gguf" and m.layout == "conv":
            continue
        if fmt == "kohya" and m.layout == "embedding":
            continue
        if fmt in ("kohya", "gguf"):
            m.bias = None
        if fmt == "gguf":
            m.magnitude = None
        out.modules[k] = m
    return out


def drop_base_copies(ad: Any, base: Checkpoint) -> list[str]:
    """Remove the full tensors that equal the base's own (PEFT saves ``base_layer.weight``
    copies of adapted embeddings and heads); they change nothing when merged, and formats
    without full tensors (kohya, GGUF) can then hold the adapter. Returns their names."""
    import torch

    same = []
    for name, t in list(ad.full.items()):
        info = base.tensors.get(name)
        if info is not None and tuple(info.shape) == tuple(t.shape) and torch.equal(
                base.load(name, dtype=t.dtype), t):
            del ad.full[name]
            same.append(name)
    return same


def write_adapter(ad: Any, out: Path, fmt: str, *, base: str | None = None,
                  force: bool = False, inputs: list[Path] | None = None, note: str = "",
                  with_info: bool = False) -> Any:
    """Write ``ad`` in ``fmt`` (refusing what the format cannot hold); the output path (and,
    with ``with_info``, the GGUF details)."""
    from ..checkpoint import open_checkpoint
    from . import diffusers, gguf, kohya, peft

    lost = lossy(ad, fmt)
    if lost:
        raise FormatError(f"{fmt} cannot hold {'; '.join(lost)}; choose another format")
    info = None
    if fmt == "peft":
        path = peft.write(ad, out, force=force, inputs=inputs, note=note)
    elif fmt == "kohya":
        path = kohya.write(ad, out, force=force, inputs=inputs)
    elif fmt == "diffusers":
        path = diffusers.write(ad, out, force=force, inputs=inputs)
    else:
        cfg = open_checkpoint(base).config if base else None
        if cfg is None:
            raise FormatError("a GGUF adapter needs --base BASE (a model folder or Hub id with "
                              "config.json): llama.cpp names tensors by architecture")
        path, info = gguf.write(ad, out, cfg, force=force, inputs=inputs)
    return (str(path), info) if with_info else str(path)
