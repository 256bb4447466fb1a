"""llama.cpp's names and layouts for an adapter's modules, both ways.

llama.cpp names tensors by architecture (``blk.0.attn_q.weight``: the ``gguf`` package's
HF→GGUF name map), stores every linear weight [out, in] (GPT-2's Conv1D transposed), permutes
the rows of the q/k projections of Llama-family models for its RoPE layout, and keeps a layer's
experts as three 3-D tensors (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``) where
transformers fuses gate and up. :func:`to_gguf` turns an adapter named as transformers names
modules into one named and laid out as llama.cpp's model is (so it merges into a GGUF model
tensor by tensor, or is written as a GGUF adapter); :func:`from_gguf` is the inverse, for a base
given as a transformers model.

Example::
    arch = Arch.of_config(base.config)
    g = to_gguf(adapter, arch)          # modules "blk.0.attn_q", B rows permuted
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gguf
import torch

from ..errors import FormatError
from ..headers import moe
from ..headers.moe import on_disk
from ..model.adapter import LoraModule

if TYPE_CHECKING:
    from ..headers.checkpoint import Checkpoint
    from ..headers.gguf import GgufHeader
    from ..model.adapter import LoraAdapter

# transformers model_type → llama.cpp architecture (its converter's registrations)
ARCHES = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "granite": "granite",
    "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
    "phi3": "phi3", "olmo": "olmo", "olmo2": "olmo2", "olmoe": "olmoe",
    "starcoder2": "starcoder2", "stablelm": "stablelm", "deepseek": "deepseek",
    "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss",
    "falcon": "falcon", "gpt2": "gpt2", "bert": "bert",
}
# architectures whose converter permutes the q/k rows (LlamaModel.permute and its kin)
PERMUTED = ("llama", "granite", "olmo", "deepseek")
# modules the converter reshapes in ways a pair of factors cannot follow
REFUSED = {("falcon", "query_key_value"): "llama.cpp regroups Falcon's fused QKV rows per head",
           ("deepseek2", "kv_b_proj"): "llama.cpp splits and transposes kv_b_proj per head",
           ("gpt-oss", "experts"): "llama.cpp de-interleaves gpt-oss's fused expert weights"}


@dataclass(frozen=True)
class Arch:
    """What naming and laying out tensors for llama.cpp needs of a model."""

    name: str  # llama.cpp's architecture name
    n_layers: int
    n_head: int
    n_kv: int

    @property
    def permute(self) -> bool:
        return self.name in PERMUTED

    @staticmethod
    def of_config(cfg: dict[str, object], where: str = "the base") -> Arch:
        """From a transformers config.json."""
        model_type = cfg.get("model_type")
        if model_type not in ARCHES:
            raise FormatError(f"{where}: llama.cpp naming for model_type {model_type!r} is not "
                              f"known (known: {', '.join(sorted(ARCHES))})")
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 0)
        return Arch(ARCHES[model_type], int(cfg.get("num_hidden_layers") or
                                            cfg.get("n_layer") or 0),
                    heads, int(cfg.get("num_key_value_heads") or heads))

    @staticmethod
    def of_header(h: GgufHeader, where: str) -> Arch:
        """From a GGUF model's metadata."""
        arch = h.architecture
        if not arch:
            raise FormatError(f"{where}: has no general.architecture")
        n = h.arch_value("block_count")
        heads = h.arch_value("attention.head_count")
        kv = h.arch_value("attention.head_count_kv")
        return Arch(arch, int(n or 0), int(heads or 0), int(kv or heads or 0))

    def tensor_map(self) -> gguf.TensorNameMap:
        try:
            enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)
        except StopIteration:
            raise FormatError(f"the gguf package does not know architecture {self.name}"
                              ) from None
        return gguf.get_tensor_name_map(enum, self.n_layers)


def permute_rows(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's q/k row permutation (its converter's ``LlamaModel.permute``), or its
    inverse: rows within each head reordered, a pure data movement."""
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise FormatError(f"cannot permute {rows} rows for {n_head} heads")
    if inverse:
        return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _name(tmap: gguf.TensorNameMap, hf: str) -> str | None:
    for n in on_disk(hf):
        found = tmap.get_name(n + ".weight", try_suffixes=(".weight",))
        if found is not None:
            return found[: -len(".weight")] if found.endswith(".weight") else found
    return None


def tensor_name(arch: Arch, hf: str) -> str | None:
    """llama.cpp's name of a transformers weight (``lm_head.weight`` → ``output.weight``), or
    None where it has none."""
    module, _, leaf = hf.rpartition(".")
    found = _name(arch.tensor_map(), module)
    return f"{found}.{leaf}" if found is not None else None


def _expert_names(tmap: gguf.TensorNameMap, fused: str) -> list[tuple[str, int]]:
    """The llama.cpp tensors of a fused expert parameter: (name, row block)."""
    module, _, param = fused.rpartition(".")
    layer = module[: -len(".mlp.experts")] if module.endswith(".mlp.experts") else None
    if layer is None:
        raise FormatError(f"{fused}: not a transformers experts parameter")
    projs = (("gate_proj", "w1"), ("up_proj", "w3")) if param == "gate_up_proj" else \
        (("down_proj", "w2"),)
    out = []
    for block, names in enumerate(projs):
        found = None
        for proj in names:
            for stem in (f"{layer}.mlp.experts.{proj}", f"{layer}.block_sparse_moe.experts."
                                                         f"{proj}"):
                found = found or tmap.get_name(stem)
        if found is None:
            raise FormatError(f"{fused}: llama.cpp's name map has no tensor for it")
        out.append((found, block))
    return out


def _refuse(arch: Arch, name: str) -> None:
    for (a, part), why in REFUSED.items():
        if arch.name == a and part in name:
            raise FormatError(f"module {name}: {why}, which LoRA factors cannot follow; "
                              "merge with `loratool merge` into the transformers model instead")


def to_gguf(ad: LoraAdapter, arch: Arch) -> LoraAdapter:
    """A copy of ``ad`` named and laid out as llama.cpp's model of ``arch``: modules
    ``blk.N.…`` whose ΔW is the GGUF weight's change."""

    tmap = arch.tensor_map()
    out = copy.copy(ad)
    out.modules, out.naming = {}, "gguf"
    for m in ad.modules.values():
        _refuse(arch, m.name)
        if m.experts:
            if m.layout != "experts":
                raise FormatError(f"module {m.name}: experts stored [E, in, out] have no "
                                  "llama.cpp layout loratool knows")
            blocks = _expert_names(tmap, m.name)
            rows = m.B.shape[1] // len(blocks)
            for name, block in blocks:
                out.add(LoraModule(name, m.A, m.B[:, block * rows:(block + 1) * rows],
                                   m.alpha, m.rslora, "experts"))
            continue
        name = _name(tmap, m.name)
        if name is None:
            raise FormatError(f"module {m.name}: no llama.cpp tensor name for it in the "
                              f"{arch.name} map")
        B = m.B
        if arch.permute and m.name.endswith(("q_proj", "k_proj")):
            B = permute_rows(B, arch.n_head if m.name.endswith("q_proj") else arch.n_kv)
        # GPT-2's Conv1D weight is stored [out, in] by llama.cpp: a plain linear change there
        layout = "linear" if m.layout == "fan_in_fan_out" else m.layout
        out.add(LoraModule(name, m.A, B, m.alpha, m.rslora, layout, m.magnitude, m.bias))
    return out


def from_gguf(ad: LoraAdapter, arch: Arch, base: Checkpoint, model_type: str | None
              ) -> LoraAdapter:
    """``ad`` named as llama.cpp names tensors, renamed for the transformers model ``base``
    (q/k rows un-permuted; a layer's gate and up experts fused as transformers fuses them)."""

    tmap = arch.tensor_map()
    back: dict[str, tuple[str, int]] = {}  # gguf module → (transformers module, block)
    for n, info in base.tensors.items():
        if n.endswith(".weight") and len(info.shape) >= 2:
            g = _name(tmap, n[: -len(".weight")])
            if g is not None:
                back.setdefault(g, (moe.in_memory(n[: -len(".weight")], model_type), 0))
    for fused in moe.group(list(base.tensors)):
        for g, block in _expert_names(tmap, moe.in_memory(fused, model_type)):
            back[g] = (moe.in_memory(fused, model_type), block)
    out = copy.copy(ad)
    out.modules, out.naming = {}, "hf"
    pending: dict[str, dict[int, LoraModule]] = {}
    for m in ad.modules.values():
        if m.name not in back:
            raise FormatError(f"tensor {m.name}: the base has no module llama.cpp names so")
        hf, block = back[m.name]
        if m.experts:
            pending.setdefault(hf, {})[block] = m
            continue
        B = m.B
        if arch.permute and hf.endswith(("q_proj", "k_proj")):
            B = permute_rows(B, arch.n_head if hf.endswith("q_proj") else arch.n_kv, True)
        out.add(LoraModule(hf, m.A, B, m.alpha, m.rslora, m.layout, m.magnitude, m.bias))
    for hf, blocks in pending.items():
        out.add(_fuse(hf, [blocks[b] for b in sorted(blocks)]))
    return out


def _fuse(name: str, parts: list[LoraModule]) -> LoraModule:
    """gate and up experts as one gate_up_proj module: one A when they share it, else both
    A's stacked and B block-diagonal (rank r_gate + r_up): the same ΔW either way."""

    first = parts[0]
    if len(parts) == 1:
        return LoraModule(name, first.A, first.B, first.alpha, first.rslora, "experts")
    if all(p.scale == first.scale and torch.equal(p.A, first.A) for p in parts):
        return LoraModule(name, first.A, torch.cat([p.B for p in parts], 1), first.alpha,
                          first.rslora, "experts")
    E, dtype = first.A.shape[0], first.A.dtype
    r = sum(p.rank for p in parts)
    A = torch.cat([p.A for p in parts], 1)
    B = torch.zeros(E, sum(p.B.shape[1] for p in parts), r, dtype=dtype)
    row = col = 0
    for p in parts:  # each block's scale folded into its B (one scale for the module)
        b = p.B if p.scale == 1.0 else (p.B.float() * p.scale).to(dtype)
        B[:, row:row + p.B.shape[1], col:col + p.rank] = b
        row, col = row + p.B.shape[1], col + p.rank
    return LoraModule(name, A, B, float(r), False, "experts")
