"""The original (SGM / LDM) names of a diffusers UNet's modules: what kohya sd-scripts uses for
SDXL (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and what single-file
checkpoints store under ``model.diffusion_model.``.

The two layouts number blocks differently: SGM counts ``input_blocks`` through every resnet,
attention and downsampler of the down path (``input_blocks.0`` is ``conv_in``), has three
``middle_block`` entries and counts ``output_blocks`` through the up path, each holding a
resnet, an attention and an upsampler. The map is built from the UNet's config
(``layers_per_block``, which blocks have attention), so it holds for SD 1.x, SD 2.x and SDXL.

Example::

    to_sgm("down_blocks.1.attentions.0.proj_in", config)  # → "input_blocks.4.1.proj_in"
"""

from __future__ import annotations

import re
from typing import Any

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
WHOLE = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
         "conv_out": "out.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|"
                    r"upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def is_unet(config: dict[str, Any] | None) -> bool:
    return bool(config) and config.get("_class_name") == "UNet2DConditionModel"  # type: ignore


def is_sdxl(config: dict[str, Any] | None) -> bool:
    """A UNet with SDXL's added time and text conditioning."""
    return is_unet(config) and config.get("addition_embed_type") == "text_time"  # type: ignore


def _layers(config: dict[str, Any], b: int) -> int:
    lpb = config.get("layers_per_block", 2)
    return int(lpb[b] if isinstance(lpb, (list, tuple)) else lpb)


def _inner(kind: str, rest: str | None) -> str | None:
    """A resnet's inner names change (conv1 → in_layers.2); an attention's do not."""
    if not rest:
        return None if kind == "resnets" else ""
    if kind != "resnets":
        return rest
    head, _, tail = rest.partition(".")
    return RESNET[head] + ("." + tail if tail else "") if head in RESNET else None


def to_sgm(name: str, config: dict[str, Any]) -> str | None:
    """A diffusers UNet module name in SGM naming, or None where the layouts have no
    counterpart."""
    if name in WHOLE:
        return WHOLE[name]
    m = _MID.match(name)
    if m:
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        inner = _inner(kind, rest)
        idx = 1 if kind == "attentions" else 2 * i
        return None if inner is None else f"middle_block.{idx}" + (f".{inner}" if inner else "")
    m = _BLOCK.match(name)
    if not m:
        return None
    path, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), \
        m.group(5)
    if path == "down_blocks":
        first = 1 + sum(_layers(config, k) + 1 for k in range(b))
        if kind == "downsamplers":
            return f"input_blocks.{first + _layers(config, b)}.0.op" if rest == "conv" else None
        inner = _inner(kind, rest)
        sub = 0 if kind == "resnets" else 1
    else:
        n = len(config.get("up_block_types") or [])
        # up blocks have one layer more than the down block they mirror
        first = sum(_layers(config, n - 1 - k) + 1 for k in range(b))
        if kind == "upsamplers":
            if rest != "conv":
                return None
            attn = "CrossAttn" in (config.get("up_block_types") or [""] * (b + 1))[b]
            return f"output_blocks.{first + _layers(config, n - 1 - b)}.{2 if attn else 1}.conv"
        inner = _inner(kind, rest)
        sub = 0 if kind == "resnets" else 1
    if inner is None:
        return None
    return f"{'input' if path == 'down_blocks' else 'output'}_blocks.{first + i}.{sub}" + (
        f".{inner}" if inner else "")
