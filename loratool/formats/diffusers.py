"""diffusers LoRA files: ``pytorch_lora_weights.safetensors``.

Keys are PEFT keys behind a component prefix (``unet.``, ``transformer.``, ``text_encoder.``,
``text_encoder_2.``): ``unet.down_blocks.0.….to_q.lora_A.weight``. The PEFT config of each
component sits, prefixed the same way, as JSON under the header key ``lora_adapter_metadata``
(diffusers ≥ 0.33). Without it diffusers takes alpha = r (scale 1), and so does loratool.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..formats import peft
from ..formats.base import Format, held, losses
from ..headers.checkpoint import Checkpoint
from ..headers.checks import ADAPTER_CONFIG, check_fields, parse_json
from ..io.writer import CheckpointWriter
from ..model.adapter import LoraAdapter

META_KEY = "lora_adapter_metadata"
COMPONENTS_KEY = "loratool.components"  # {written prefix: original component or null}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
              "prior", "decoder")


WEIGHTS = "pytorch_lora_weights.safetensors"


def claims(ckpt: Checkpoint) -> bool:
    """A diffusers file has no adapter_config.json: its config rides in the header, or every
    key starts with a pipeline component."""
    return ckpt.adapter_config is None and (META_KEY in ckpt.metadata or all(
        n.startswith(tuple(c + "." for c in COMPONENTS)) for n in ckpt.tensors))


def read(ckpt: Checkpoint, base: str | None = None) -> Any:
    """A diffusers LoRA file → LoraAdapter (one component per key prefix)."""

    where = str(ckpt.source or ckpt.path)
    meta = dict(ckpt.metadata)
    packed = parse_json(meta.pop(META_KEY), where, f"header metadata {META_KEY}") \
        if META_KEY in meta else None
    renamed = parse_json(meta.pop(COMPONENTS_KEY, "{}"), where, f"header metadata "
                         f"{COMPONENTS_KEY}")
    if packed is not None and not isinstance(packed, dict):
        raise FormatError(f"{where}: header metadata {META_KEY} must be a JSON object")
    if not isinstance(renamed, dict) or not all(v is None or isinstance(v, str)
                                                for v in renamed.values()):
        raise FormatError(f"{where}: header metadata {COMPONENTS_KEY} must map prefixes to "
                          "component names")
    by_comp: dict[str, dict[str, Any]] = {}
    for key in ckpt.tensors:
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS or not rest:
            raise FormatError(f"{where}: unknown key pattern {key!r} (diffusers keys start with "
                              f"one of {', '.join(COMPONENTS)})")
        by_comp.setdefault(comp, {})[rest] = ckpt.load(key)
    ad = LoraAdapter(source_format="diffusers", metadata=meta)
    for comp, state in by_comp.items():
        if packed is not None:
            cfg = {k[len(comp) + 1:]: v for k, v in packed.items() if k.startswith(comp + ".")}
            if not cfg:
                raise FormatError(f"{where}: {META_KEY} has no config for component {comp}")
            check_fields(cfg, ADAPTER_CONFIG, f"{where}: {META_KEY} of {comp}")
            modules, full = peft.modules_from_state(state, cfg, where, comp, prefix="")
        else:
            modules, full = peft.modules_from_state(state, {"r": 0, "lora_alpha": 0}, where,
                                                    comp, prefix="")
            for m in modules:
                m.alpha = float(m.rank)  # diffusers' default without metadata: scale 1
        if full:
            raise FormatError(f"{where}: {comp} holds full tensors ({next(iter(full))} …), "
                              "which diffusers LoRA files do not carry")
        original = renamed.get(comp, comp)
        for m in modules:
            m.component = original
            ad.add(m)
        if packed is not None:
            ad.base_model = ad.base_model or cfg.get("base_model_name_or_path")
    return ad


def lossy(ad: Any) -> list[str]:
    """What a diffusers LoRA file cannot hold."""
    return losses(ad, [("mixture-of-experts parameters", lambda m: bool(m.experts))],
                  full=True)


def keep(ad: Any) -> Any:
    return held(ad, full=False)


def write(ad: Any, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None) -> Path:
    """``out`` ending in .safetensors, else ``out/pytorch_lora_weights.safetensors``."""

    packed: dict[str, Any] = {}
    renamed: dict[str, str | None] = {}
    tensors: dict[str, Any] = {}
    for comp in ad.components:
        # an adapter for a plain model (no component) is written as the pipeline's denoiser
        written = comp if comp is not None else "transformer"
        if written in renamed:
            raise FormatError(f"components {renamed[written]} and {comp} would share prefix "
                              f"{written}")
        renamed[written] = comp
        cfg, mods = peft.peft_config_for(ad, comp)
        cfg.pop("modules_to_save")
        if cfg.get("ensure_weight_tying") is None:
            cfg.pop("ensure_weight_tying")
        packed.update({f"{written}.{k}": (list(v) if isinstance(v, (set, tuple)) else v)
                       for k, v in cfg.items()})
        for k, t in peft.state_for(mods, {}, prefix=written + ".").items():
            tensors[k] = t
    meta = {k: v for k, v in ad.metadata.items() if k not in (META_KEY, COMPONENTS_KEY)}
    meta[META_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    if any(k != v for k, v in renamed.items()):
        meta[COMPONENTS_KEY] = json.dumps(renamed)
    w, target = CheckpointWriter.file_or_folder(out, WEIGHTS, inputs=inputs, force=force,
                                                metadata=meta)
    with w:
        for k, t in tensors.items():
            w.add(k, t)
    return target


FORMAT = Format("diffusers", "one .safetensors file", ".safetensors", WEIGHTS, claims, read,
                lambda ad, out, **kw: (write(ad, out, **kw), None), lossy, keep)
