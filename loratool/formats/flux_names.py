"""The original module names of Flux (BFL's) and SD3 (Stability's MMDiT), which kohya
sd-scripts uses for their LoRA (``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_unet_joint_blocks_0_x_block_attn_qkv``) and single-file checkpoints store, against
diffusers' ``FluxTransformer2DModel`` and ``SD3Transformer2DModel``.

The originals fuse what diffusers keeps apart: ``img_attn.qkv`` / ``x_block.attn.qkv`` is
diffusers' ``attn.to_q``/``to_k``/``to_v`` stacked by rows, a Flux single block's ``linear1``
is ``to_q``/``to_k``/``to_v``/``proj_mlp``, and the final (and SD3's last context) modulation
emits (shift, scale) where diffusers emits (scale, shift). A LoRA on a fused weight is split
exactly (each part keeps A and its rows of B); LoRAs on the parts fuse exactly into one of
rank Σrᵢ (A stacked, B block-diagonal with each part's scale folded in, alpha = rank).

Example: ``original_map(config)["double_blocks.0.img_attn.qkv"]`` → its diffusers modules.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Mapping

import torch

from ..errors import FormatError
from ..model.adapter import LoraModule

if TYPE_CHECKING:
    from ..headers.safetensors import TensorInfo

_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "img_attn.proj": ("attn.to_out.0",), "img_mlp.0": ("ff.net.0.proj",),
           "img_mlp.2": ("ff.net.2",), "img_mod.lin": ("norm1.linear",),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "txt_attn.proj": ("attn.to_add_out",), "txt_mlp.0": ("ff_context.net.0.proj",),
           "txt_mlp.2": ("ff_context.net.2",), "txt_mod.lin": ("norm1_context.linear",)}


_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
           "linear2": ("proj_out",), "modulation.lin": ("norm.linear",)}


_OTHER = {"img_in": "x_embedder", "txt_in": "context_embedder",
          "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
          "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
          "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
          "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
          "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
          "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}


SWAPPED = "norm_out.linear"  # rows in the other order: (scale, shift) against (shift, scale)
_SD3_BLOCK = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj",
                                         "attn.add_v_proj"),
              "x_block.attn.proj": ("attn.to_out.0",),
              "context_block.attn.proj": ("attn.to_add_out",),
              "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
              "x_block.attn2.proj": ("attn2.to_out.0",),
              "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
              "context_block.mlp.fc1": ("ff_context.net.0.proj",),
              "context_block.mlp.fc2": ("ff_context.net.2",),
              "x_block.adaLN_modulation.1": ("norm1.linear",),
              "context_block.adaLN_modulation.1": ("norm1_context.linear",)}


_SD3_OTHER = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
              "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
              "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
              "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
              "final_layer.linear": "proj_out",
              "final_layer.adaLN_modulation.1": "norm_out.linear"}


CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel")


def is_fused(config: dict[str, object] | None) -> bool:
    """A transformer whose original checkpoints fuse modules: Flux or SD3."""
    return bool(config) and config.get("_class_name") in CLASSES  # type: ignore


def original_map(config: dict[str, object]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Every original module name → (the diffusers modules it holds in row order, whether its
    two halves of rows are swapped)."""
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    n = int(config.get("num_layers", 19))
    if config.get("_class_name") == "SD3Transformer2DModel":
        out.update({k: ((v,), v == SWAPPED) for k, v in _SD3_OTHER.items()})
        for i in range(n):
            out.update({f"joint_blocks.{i}.{k}": (tuple(f"transformer_blocks.{i}.{p}"
                                                        for p in v), False)
                        for k, v in _SD3_BLOCK.items()})
        last = f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1"
        out[last] = (out[last][0], True)  # the last context block is "pre only"
        return out
    out.update({k: ((v,), v == SWAPPED) for k, v in _OTHER.items()})
    for i in range(n):
        out.update({f"double_blocks.{i}.{k}": (tuple(f"transformer_blocks.{i}.{p}"
                                                     for p in v), False)
                    for k, v in _DOUBLE.items()})
    for i in range(int(config.get("num_single_layers", 38))):
        out.update({f"single_blocks.{i}.{k}": (tuple(f"single_transformer_blocks.{i}.{p}"
                                                     for p in v), False)
                    for k, v in _SINGLE.items()})
    return out


def swap_rows(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) ↔ (scale, shift): the two halves of the rows exchanged."""

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def split(m: LoraModule, parts: tuple[str, ...], rows: list[int], swapped: bool
          ) -> list[LoraModule]:
    """A LoRA on a fused BFL weight as LoRAs on diffusers' parts: each part's rows of B and
    the same scale: exactly the same ΔW rows. Columns of B a part does not use (a fused file
    made from separate LoRAs is block-diagonal) are dropped with their rows of A, and a part
    with no change at all is left out: the same products without the zero terms."""

    if m.magnitude is not None or m.bias is not None:
        raise FormatError(f"module {m.key}: DoRA or a bias on a fused Flux weight cannot be "
                          "split into diffusers' modules")
    out, start = [], 0
    B = swap_rows(m.B) if swapped else m.B
    for name, n in zip(parts, rows):
        p = copy.copy(m)
        p.name, p.B = name, B[start:start + n]
        used = p.B.abs().sum(dim=0) != 0
        start += n
        if not bool(used.any()):
            continue
        if not bool(used.all()):
            p.A, p.B = m.A[used], p.B[:, used]
            p.alpha = m.scale * int(used.sum())  # the same scale at the smaller rank
            p.rslora = False
        p.A, p.B = p.A.contiguous(), p.B.contiguous()
        out.append(p)
    if start != m.B.shape[0]:
        raise FormatError(f"module {m.key}: {m.B.shape[0]} output rows, but the base's "
                          f"{', '.join(parts)} have {start}")
    return out


def fuse(name: str, parts: list[LoraModule | None], rows: list[int], dtype: torch.dtype
         ) -> LoraModule:
    """LoRAs on some of a fused weight's parts as one LoRA on the fused weight: A stacked
    [Σr, in], B block-diagonal [Σrows, Σr] with each part's scale folded in (a part without
    LoRA gets zero rows), alpha = Σr so the scale is 1."""

    present = [m for m in parts if m is not None]
    A = torch.cat([m.A.to(torch.float32) for m in present], dim=0)
    B = torch.zeros(sum(rows), A.shape[0], dtype=torch.float32)
    r0, c0 = 0, 0
    for m, n in zip(parts, rows):
        if m is not None:
            B[r0:r0 + n, c0:c0 + m.rank] = m.B.to(torch.float32) * m.scale
            c0 += m.rank
        r0 += n
    first = present[0]
    return LoraModule(name, A.to(dtype), B.to(dtype), float(A.shape[0]), False, "linear",
                      component=first.component)


def to_original(modules: list[LoraModule], config: dict[str, object],
                shapes: Mapping[str, TensorInfo]) -> tuple[list[LoraModule], set[str]] | None:
    """A Flux or SD3 transformer's LoRA modules named as the original model names them
    (parts fused, one rank Σrᵢ), for kohya files; and the keys of the modules that now carry
    original names. None when a module has no counterpart or cannot be fused (DoRA, bias)."""

    where: dict[str, tuple[str, int, tuple[str, ...], bool]] = {}
    for orig, (parts, swapped) in original_map(config).items():
        for i, p in enumerate(parts):
            where[p] = (orig, i, parts, swapped)
    groups: dict[str, list[LoraModule | None]] = {}
    for m in modules:
        if m.name not in where or m.magnitude is not None or m.bias is not None or (
                len(where[m.name][2]) > 1 and m.layout != "linear"):
            return None
        orig, i, parts, _ = where[m.name]
        groups.setdefault(orig, [None] * len(parts))[i] = m
    out, named = [], set()
    for bfl, members in groups.items():
        _, _, parts, swapped = where[next(m for m in members if m is not None).name]
        if len(parts) == 1:  # a rename (rows swapped for a final modulation): exact
            m = copy.copy(members[0])
            m.name = bfl
            if swapped:
                # scale folded in, alpha = rank: diffusers' Flux converter ignores this
                # module's alpha (a TODO there), and every loader then agrees
                m.B = (swap_rows(m.B).float() * m.scale).to(m.B.dtype)
                m.alpha, m.rslora = float(m.rank), False
        else:
            rows = [int(shapes[p + ".weight"].shape[0]) for p in parts]
            m = fuse(bfl, members, rows, members[0].A.dtype if members[0] is not None else
                     next(x for x in members if x is not None).A.dtype)
            m.component = next(x for x in members if x is not None).component
        out.append(m)
        named.add(m.key)
    return out, named
