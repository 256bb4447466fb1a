"""diffusers LoRA files: ``pytorch_lora_weights.safetensors``.

Keys are PEFT keys behind a component prefix (``unet.``, ``transformer.``, ``text_encoder.``,
``text_encoder_2.``): ``unet.down_blocks.0.….to_q.lora_A.weight``. The PEFT config of each
component sits, prefixed the same way, as JSON under the header key ``lora_adapter_metadata``
(diffusers ≥ 0.33). Without it diffusers takes alpha = r (scale 1), and so does loratool. The
file's layout is read by ``loratool.headers.adapters.diffusers_layout``.

Example::

    ad = read(open_checkpoint("pytorch_lora_weights.safetensors"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError
from ..formats import peft
from ..formats.base import Format, held, losses
from ..headers.adapters import DIFFUSERS_META, DIFFUSERS_RENAMED, diffusers_layout, is_diffusers
from ..headers.checkpoint import Checkpoint
from ..io.writer import CheckpointWriter
from ..model.adapter import LoraAdapter
from ..options import Options

if TYPE_CHECKING:
    import torch

WEIGHTS = "pytorch_lora_weights.safetensors"


def read(ckpt: Checkpoint, base: str | None = None) -> LoraAdapter:
    """A diffusers LoRA file → LoraAdapter (one component per key prefix)."""
    where = str(ckpt.source or ckpt.path)
    by_comp, configs, original, meta = diffusers_layout(ckpt)
    ad = LoraAdapter(source_format="diffusers", metadata=meta)
    for comp, infos in by_comp.items():
        state = {rest: ckpt.load(info.name) for rest, info in infos.items()}
        cfg = configs[comp]
        modules, full = peft.modules_from_state(state, cfg if cfg is not None else {
            "r": 0, "lora_alpha": 0}, where, comp, prefix="")
        if cfg is None:
            for m in modules:
                m.alpha = float(m.rank)  # diffusers' default without metadata: scale 1
        if full:
            raise FormatError(f"{where}: {comp} holds full tensors ({next(iter(full))} …), "
                              "which diffusers LoRA files do not carry")
        for m in modules:
            m.component = original[comp]
            ad.add(m)
        if cfg is not None:
            ad.base_model = ad.base_model or cfg.get("base_model_name_or_path")
    return ad


def lossy(ad: LoraAdapter) -> list[str]:
    """What a diffusers LoRA file cannot hold."""
    return losses(ad, [("mixture-of-experts parameters", lambda m: bool(m.experts))],
                  full=True)


def keep(ad: LoraAdapter) -> LoraAdapter:
    return held(ad, full=False)


def write(ad: LoraAdapter, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None, options: Options | None = None) -> Path:
    """``out`` ending in .safetensors, else ``out/pytorch_lora_weights.safetensors``."""

    packed: dict[str, object] = {}
    renamed: dict[str, str | None] = {}
    tensors: dict[str, torch.Tensor] = {}
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
    meta = {k: v for k, v in ad.metadata.items()
            if k not in (DIFFUSERS_META, DIFFUSERS_RENAMED)}
    meta[DIFFUSERS_META] = json.dumps(packed, indent=2, sort_keys=True)
    if any(k != v for k, v in renamed.items()):
        meta[DIFFUSERS_RENAMED] = json.dumps(renamed)
    w, target = CheckpointWriter.file_or_folder(out, WEIGHTS, inputs=inputs, force=force,
                                                metadata=meta, options=options)
    with w:
        for k, t in tensors.items():
            w.add(k, t)
    return target


FORMAT = Format("diffusers", "one .safetensors file", ".safetensors", WEIGHTS, is_diffusers,
                read,
                lambda ad, out, **kw: (write(ad, out, **kw), None), lossy, keep)
