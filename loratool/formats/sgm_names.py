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

import copy
import re
from typing import TYPE_CHECKING, Collection

from ..errors import FormatError

if TYPE_CHECKING:
    from ..model.adapter import LoraAdapter

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


WHOLE = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
         "conv_out": "out.2"}


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|"
                    r"upsamplers)\.(\d+)(?:\.(.*))?$")


_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def is_unet(config: dict[str, object] | None) -> bool:
    return bool(config) and config.get("_class_name") == "UNet2DConditionModel"  # type: ignore


def is_sdxl(config: dict[str, object] | None) -> bool:
    """A UNet with SDXL's added time and text conditioning."""
    return is_unet(config) and config.get("addition_embed_type") == "text_time"  # type: ignore


def _layers(config: dict[str, object], b: int) -> int:
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


def to_sgm(name: str, config: dict[str, object]) -> str | None:
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


_SGM = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)(?:\.(\d+))?(?:\.(.*))?$")
_RESNET_BACK = {v: k for k, v in RESNET.items()}
_WHOLE_BACK = {v: k for k, v in WHOLE.items()}


def _inner_back(kind: str, rest: str | None) -> str | None:
    if kind != "resnets":
        return rest or ""
    for sgm, ours in _RESNET_BACK.items():
        if rest == sgm or (rest or "").startswith(sgm + "."):
            return ours + (rest or "")[len(sgm):]
    return None


def from_sgm(name: str, config: dict[str, object]) -> str | None:
    """The inverse of :func:`to_sgm`: an SGM module name as the diffusers UNet names it."""
    if name in _WHOLE_BACK:
        return _WHOLE_BACK[name]
    m = _SGM.match(name)
    if not m or m.group(3) is None and m.group(1) != "middle_block":
        return None
    where, i = m.group(1), int(m.group(2))
    if where == "middle_block":
        j, rest = None, ".".join(x for x in (m.group(3), m.group(4)) if x is not None)
        kind, idx = ("attentions", 0) if i == 1 else ("resnets", i // 2)
        inner = _inner_back(kind, rest)
        return None if inner is None or i > 2 else f"mid_block.{kind}.{idx}" + (
            f".{inner}" if inner else "")
    j, rest = int(m.group(3)), m.group(4)
    n = len(config.get("up_block_types") or [])
    if where == "input_blocks":
        b, k = 0, i - 1
        while b < n and k > _layers(config, b):
            k -= _layers(config, b) + 1
            b += 1
        if b >= n or k < 0:
            return None
        if k == _layers(config, b):
            return f"down_blocks.{b}.downsamplers.0.conv" if (j, rest) == (0, "op") else None
        kind = "resnets" if j == 0 else "attentions"
        path = "down_blocks"
    else:
        b, k = 0, i
        while b < n and k > _layers(config, n - 1 - b):
            k -= _layers(config, n - 1 - b) + 1
            b += 1
        if b >= n:
            return None
        attn = "CrossAttn" in config["up_block_types"][b]
        if (j == 2 or (j == 1 and not attn)) and rest == "conv":
            return f"up_blocks.{b}.upsamplers.0.conv"
        kind = "resnets" if j == 0 else "attentions"
        path = "up_blocks"
    inner = _inner_back(kind, rest)
    return None if inner is None else f"{path}.{b}.{kind}.{k}" + (f".{inner}" if inner else "")


UNET_PREFIX = "model.diffusion_model."
# where single-file checkpoints keep a text encoder in transformers' CLIP layout (SD 1.x; SDXL's
# first); SD 2.x's and SDXL's OpenCLIP encoders (cond_stage_model.model., conditioner.embedders.1
# .model.) fuse q, k and v and have no such names
TEXT_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def single_file_config(names: Collection[str]) -> dict[str, object] | None:
    """For a single-file Stable Diffusion checkpoint (``model.diffusion_model.*`` keys), the
    UNet structure its keys show (layers per block 2, which up blocks have attention); None
    for anything else."""
    ins = {int(n.split(".")[3]) for n in names if n.startswith(UNET_PREFIX + "input_blocks.")}
    if not ins:
        return None
    lpb = 2
    blocks = (max(ins) + 2) // (lpb + 1)  # the last down block has no downsampler
    ups = [f"{UNET_PREFIX}output_blocks.{b * (lpb + 1)}.1.transformer_blocks" for b in
           range(blocks)]
    return {"_class_name": "UNet2DConditionModel", "layers_per_block": lpb,
            "up_block_types": ["CrossAttnUpBlock2D" if any(n.startswith(u) for n in names)
                               else "UpBlock2D" for u in ups]}


def text_prefix(names: Collection[str]) -> str | None:
    """The prefix under which a single file keeps its transformers-layout CLIP text encoder."""
    return next((p for p in TEXT_PREFIXES if any(n.startswith(p) for n in names)), None)


def to_single_file(ad: LoraAdapter, names: Collection[str], config: dict[str, object],
                   spec: str) -> LoraAdapter:
    """An adapter for a pipeline's components renamed to a single-file checkpoint's tensors:
    the UNet's modules under ``model.diffusion_model.`` by their SGM names, the text
    encoder's under the file's CLIP prefix; one model, no components."""

    out = copy.copy(ad)
    out.modules, out.lyco = {}, {}
    te = text_prefix(names)
    for m in (*ad.modules.values(), *ad.lyco.values()):
        m = copy.copy(m)
        if m.component in ("unet", None) and not m.name.startswith(UNET_PREFIX):
            sgm = to_sgm(m.name, config)
            if sgm is None:
                raise FormatError(f"{spec}: {m.key} has no counterpart in the single-file "
                                  "checkpoint's UNet")
            m.name = UNET_PREFIX + sgm
        elif m.component == "text_encoder" and te is not None:
            m.name = te + m.name
        elif m.component is not None:
            raise FormatError(f"{spec}: changes {m.component}, which this single-file "
                              "checkpoint does not hold in transformers' layout (SDXL's second "
                              "and SD 2's text encoders are OpenCLIP's, q, k and v fused); "
                              "merge into the diffusers pipeline folder instead")
        m.component = None
        out.add(m)
    return out
