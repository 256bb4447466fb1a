"""kohya / sd-scripts LoRA files (also what LyCORIS, ComfyUI and A1111 read).

One safetensors file; keys ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_``,
``lora_te2_``) with the module path's dots turned into underscores, then ``.lora_down.weight``
[r, in(, kh, kw)], ``.lora_up.weight`` [out, r(, 1, 1)], ``.alpha`` (0-d) and, from LyCORIS,
``.dora_scale`` [out, 1, …]. Scale is alpha / r; a missing or zero alpha means alpha = r.

Underscored names are ambiguous (``layers_0`` or ``layers.0``?), so loratool records the real
module names in the header (``loratool.modules``) when it writes, and otherwise resolves them
against a base checkpoint given with ``--base``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import Checkpoint, natural_key
from ..errors import FormatError
from ..validate import parse_json

NAMES_KEY = "loratool.modules"  # {stem: [component, module name, layout]}
PREFIX_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
_KEY = re.compile(r"^(?P<stem>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down\.weight|"
                  r"lora_up\.weight|alpha|dora_scale|lora_mid\.weight)$")
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")

Resolver = Callable[[str | None, str], str | None]


def split_stem(stem: str) -> tuple[str, str]:
    """``lora_te2_text_model_x`` → (``lora_te2_``, ``text_model_x``)."""
    for p in sorted(PREFIX_COMPONENT, key=len, reverse=True):
        if stem.startswith(p):
            return p, stem[len(p):]
    raise FormatError(f"unknown kohya key prefix in {stem!r}")


def read(ckpt: Checkpoint, resolver: Resolver | None = None) -> Any:
    """A kohya LoRA file → LoraAdapter. Names come from loratool's header record, else from
    ``resolver`` (built from ``--base``), else they stay underscored (``unresolved``)."""
    from ..adapter import LoraAdapter, LoraModule

    where = str(ckpt.source or ckpt.path)
    meta = dict(ckpt.metadata)
    names = parse_json(meta.pop(NAMES_KEY, "{}"), where, f"header metadata {NAMES_KEY}")
    if not isinstance(names, dict) or not all(
            isinstance(v, list) and len(v) == 3 and (v[0] is None or isinstance(v[0], str))
            and isinstance(v[1], str) and v[2] in ("linear", "conv", "fan_in_fan_out",
                                                   "embedding") for v in names.values()):
        raise FormatError(f"{where}: header metadata {NAMES_KEY} must map each module to "
                          "[component, name, layout]; the file was changed by hand or damaged")
    groups: dict[str, dict[str, Any]] = {}
    for key in ckpt.tensors:
        m = _KEY.match(key)
        if not m:
            raise FormatError(f"{where}: unknown key pattern {key!r} (expected lora_unet_*/"
                              "lora_te*_* with lora_down/lora_up/alpha)")
        if m.group("part") == "lora_mid.weight":
            raise FormatError(f"{where}: {key!r}: LoCon/Tucker mid factors are not supported")
        groups.setdefault(m.group("stem"), {})[m.group("part")] = ckpt.load(key)
    ad = LoraAdapter(source_format="kohya", metadata=meta)
    unresolved = []
    for stem in sorted(groups, key=natural_key):
        g = groups[stem]
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            have = "lora_down" if "lora_down.weight" in g else "lora_up"
            if "lora_down.weight" not in g and "lora_up.weight" not in g:
                have = "only an alpha"
            raise FormatError(f"{where}: module {stem} has {have} but not both lora_down and "
                              "lora_up; the file is incomplete")
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        prefix, rest = split_stem(stem)
        layout = "conv" if down.dim() > 2 else "linear"
        if stem in names:
            component, name, layout = names[stem]
        else:
            component = PREFIX_COMPONENT[prefix]
            name = resolver(component, rest) if resolver else None
            if resolver is not None and name is None:
                raise FormatError(f"{where}: module {stem}: no module {rest!r} (dots for "
                                  "underscores) in the base; is --base the right model?")
            if name is None:
                unresolved.append(stem)
                name = rest
            elif resolver is not None and getattr(resolver, "single_model", False):
                component = None
        rank = down.shape[0]
        alpha_t = g.get("alpha")
        if alpha_t is not None and alpha_t.numel() != 1:
            raise FormatError(f"{where}: {stem}.alpha must be one number, has shape "
                              f"{list(alpha_t.shape)}")
        alpha = float(alpha_t.reshape(-1)[0]) if alpha_t is not None else 0.0
        if not math.isfinite(alpha):
            raise FormatError(f"{where}: {stem}.alpha is {alpha}, not a finite number")
        if alpha == 0.0:
            alpha = float(rank)  # kohya: a missing or zero alpha means alpha = rank
        mag = g.get("dora_scale")
        if mag is not None:
            if mag.shape[0] != up.shape[0] or mag.numel() != up.shape[0]:
                raise FormatError(f"{where}: {stem}.dora_scale has shape {list(mag.shape)}: only "
                                  "the per-output form [out, 1, …] (LyCORIS wd_on_out) is read")
            mag = mag.reshape(-1)
        ad.add(LoraModule(name, down, up, alpha, False, layout, mag, None, component))
    ad.unresolved = unresolved  # type: ignore[attr-defined]
    return ad


def lossy(ad: Any) -> list[str]:
    """What a kohya file cannot hold."""
    out = []
    emb = [m.key for m in ad.modules.values() if m.layout == "embedding"]
    if emb:
        out.append(f"embedding LoRA on {len(emb)} modules ({emb[0]} …)")
    bias = [m.key for m in ad.modules.values() if m.bias is not None]
    if bias:
        out.append(f"lora_B bias on {len(bias)} modules")
    if ad.full:
        out.append(f"{len(ad.full)} full tensors (modules_to_save)")
    return out


def write(ad: Any, out: Path, *, force: bool = False, inputs: list[Path] | None = None) -> Path:
    """One kohya safetensors file: ``out`` if it ends in .safetensors, else
    ``out/lora.safetensors``."""
    import torch

    from ..writer import CheckpointWriter

    comps = {m.component for m in ad.modules.values()}
    te = "lora_te1_" if "text_encoder_2" in comps else "lora_te_"
    prefix_of = {None: "lora_unet_", "unet": "lora_unet_", "transformer": "lora_unet_",
                 "text_encoder": te, "text_encoder_2": "lora_te2_",
                 "text_encoder_3": "lora_te3_"}
    names: dict[str, list[Any]] = {}
    tensors: dict[str, Any] = {}
    ranks, alphas = [], []
    for m in sorted(ad.modules.values(), key=lambda m: natural_key(m.key)):
        if m.component not in prefix_of:
            raise FormatError(f"module {m.key}: component {m.component!r} has no kohya prefix")
        stem = prefix_of[m.component] + m.name.replace(".", "_")
        if stem in names:
            raise FormatError(f"modules {names[stem][1]} and {m.name} both become {stem}")
        names[stem] = [m.component, m.name, m.layout]
        # kohya has no rsLoRA: restate alpha so that alpha / r is the module's scale
        alpha = m.alpha if not m.rslora else m.scale * m.rank
        tensors[stem + ".lora_down.weight"] = m.A
        tensors[stem + ".lora_up.weight"] = m.B
        tensors[stem + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if m.magnitude is not None:
            tensors[stem + ".dora_scale"] = m.magnitude.reshape(-1, *[1] * (m.A.dim() - 1))
        ranks.append(m.rank)
        alphas.append(alpha)
    meta = {k: v for k, v in ad.metadata.items() if k != NAMES_KEY}
    meta.setdefault("ss_network_module", "networks.lora")
    if ranks:
        meta.setdefault("ss_network_dim", str(max(set(ranks), key=ranks.count)))
        meta.setdefault("ss_network_alpha", f"{max(set(alphas), key=alphas.count):g}")
    if ad.base_model:
        meta.setdefault("ss_base_model_version", ad.base_model)
    meta[NAMES_KEY] = json.dumps(names, separators=(",", ":"))
    w, target = CheckpointWriter.file_or_folder(out, "lora.safetensors", inputs=inputs,
                                                force=force, metadata=meta)
    with w:
        for k, t in tensors.items():
            w.add(k, t)
    return target
