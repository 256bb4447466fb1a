"""llama.cpp GGUF LoRA adapters, read and written.

Tensors ``<gguf tensor name>.lora_a`` [r, in] and ``.lora_b`` [out, r] (numpy order; GGUF
stores the dimensions reversed), named by llama.cpp's HF→GGUF map (``blk.0.attn_q.weight``,
see ``gguf_names``); experts 3-D, ``lora_a`` [E, r, in] and ``lora_b`` [E, out, r]; metadata
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and the base
model (``general.base_model.*``) when it is a Hub id. Token-embedding LoRA is
``token_embd.weight.lora_a`` [vocab, r] (PEFT's lora_embedding_A transposed: llama.cpp gathers
its rows by token) and ``.lora_b`` [dim, r].

llama.cpp scales every module by ``alpha / r`` with one alpha for the file and r read from the
tensor shape (alpha 0: scale 1). loratool picks the alpha that most modules need (``scale · r``)
and multiplies ``lora_b`` of every other module by ``scale · r / alpha`` — exact when that factor
is a power of two, one rounding otherwise (reported). Reading gives every module alpha/r back.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import FormatError
from ..formats.base import Format, held, losses
from ..formats.gguf_names import Arch, from_gguf, to_gguf
from ..headers.adapters import gguf_alpha, gguf_pairs
from ..headers.checkpoint import Checkpoint
from ..headers.peft_config import task_type_for
from ..headers.sources import hub_repo_of
from ..io.staging import Stage, output_os_error
from ..io.tensors import open_checkpoint
from ..model.adapter import LoraAdapter, LoraModule, drop_head_mirror
from ..options import Options


def lossy(ad: LoraAdapter) -> list[str]:
    """What a GGUF adapter cannot hold."""
    return losses(ad, [("DoRA magnitude", lambda m: m.magnitude is not None),
                       ("lora_B bias", lambda m: m.bias is not None),
                       ("conv LoRA", lambda m: m.layout == "conv"),
                       ("experts stored [E, in, out]", lambda m: m.layout == "experts_t")],
                  full=True)


def keep(ad: LoraAdapter) -> LoraAdapter:
    return held(ad, full=False, bias=False, magnitude=False,
                layouts=("linear", "fan_in_fan_out", "embedding", "experts"))


def _for_tied_base(ad: LoraAdapter) -> LoraAdapter:
    """A base that ties its head to the token embeddings: llama.cpp's model has one tensor,
    token_embd, for both, and looks LoRA pairs up by tensor name, so it would apply a token
    embedding LoRA to the output layer too, in a layout that does not fit."""

    ad = copy.copy(ad)
    ad.modules = dict(ad.modules)
    drop_head_mirror(ad, "model.embed_tokens.weight")  # a copy made for PEFT: not needed here
    if any(m.name.endswith("lm_head") for m in ad.modules.values()):
        raise FormatError("the adapter changes lm_head, which this base ties to its token "
                          "embeddings: a llama.cpp model of it has no separate output tensor "
                          "(merge with `loratool merge --untie` instead)")
    if any(m.layout == "embedding" for m in ad.modules.values()):
        raise FormatError("the base ties its output layer to the token embeddings, and "
                          "llama.cpp would apply a token-embedding LoRA to both, which it "
                          "cannot: extract without --embed-lora, or merge with `loratool merge`")
    return ad


def for_llama_cpp(ad: LoraAdapter, config: dict[str, object] | None, where: str
                  ) -> tuple[LoraAdapter, str]:
    """``ad`` named and laid out as llama.cpp's model (see ``gguf_names.to_gguf``), and the
    architecture name; an adapter read from GGUF is already."""
    if ad.naming == "gguf":
        return ad, ad.metadata.get("general.architecture", "llama")
    if config is None:
        raise FormatError(f"{where}: has no config.json, which GGUF naming needs (llama.cpp "
                          "names tensors by architecture): give a transformers model folder")
    arch = Arch.of_config(config, where)
    if config.get("tie_word_embeddings"):
        ad = _for_tied_base(ad)
    return to_gguf(ad, arch), arch.name


def plan(ad: LoraAdapter) -> tuple[float, list[tuple[str, torch.Tensor, torch.Tensor, float]]]:
    """For an adapter in llama.cpp's naming: the file's alpha and, per module, (tensor name,
    lora_a, lora_b, factor baked into b)."""

    need = Counter(m.scale * m.rank for m in ad.modules.values())
    alpha = need.most_common(1)[0][0] if need else 1.0
    rows = []
    for m in sorted(ad.modules.values(), key=lambda m: m.key):
        a, b = m.A, m.B
        if m.layout == "embedding":
            a = a.T  # llama.cpp gathers lora_a's rows by token id
        factor = m.scale * m.rank / alpha
        if factor != 1.0:
            b = (b.to(torch.float32) * factor).to(b.dtype)
        rows.append((m.name + ".weight", a, b, factor))
    return alpha, rows


def _base_model(w: gguf.GGUFWriter, spec: str | None) -> None:
    """``general.base_model.*`` as llama.cpp's converter writes it, for a Hub id only (a local
    path means nothing to whoever loads the file)."""

    hub = hub_repo_of(spec)
    if hub is None:
        return
    org, name = hub[0].split("/", 1)
    w.add_base_model_count(1)
    w.add_base_model_name(0, name)
    w.add_base_model_organization(0, org)
    w.add_base_model_repo_url(0, f"https://huggingface.co/{hub[0]}")
    if hub[1]:
        w.add_base_model_version(0, hub[1])


def write(ad: LoraAdapter, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None, options: Options | None = None
          ) -> tuple[Path, dict[str, object]]:
    """Write ``out`` (a .gguf file; a folder gets ``adapter.gguf``) atomically. ``base``
    (path or Hub id) gives the architecture and llama.cpp's tensor names."""
    config = None
    if ad.naming != "gguf":
        if not base:
            raise FormatError("a GGUF adapter needs --base BASE (a model folder or Hub id with "
                              "config.json): llama.cpp names tensors by architecture")
        config = open_checkpoint(base).config

    ad, arch = for_llama_cpp(ad, config, str(base))
    alpha, rows = plan(ad)
    target = out if out.suffix == ".gguf" else out / "adapter.gguf"
    # a .gguf file, or a folder holding adapter.gguf: the same stage as every output
    with Stage(out, inputs, force, file=target.name if target is out else None,
               options=options) as stage:
        assert stage.tmp is not None
        try:
            w = gguf.GGUFWriter(str(stage.tmp / target.name), arch)
            w.add_string("general.type", "adapter")
            w.add_string("adapter.type", "lora")
            w.add_float32("adapter.lora.alpha", float(alpha))
            _base_model(w, ad.base_model)
            for name, a, b, _ in rows:
                for suffix, t in ((".lora_a", a), (".lora_b", b)):
                    # bf16 is widened to f32 (exact); f16 and f32 are kept as they are
                    keep_dtype = t.dtype in (torch.float16, torch.float32)
                    arr = t.detach().cpu().to(t.dtype if keep_dtype else torch.float32)
                    w.add_tensor(name + suffix, np.ascontiguousarray(arr.contiguous().numpy()))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        except OSError as e:
            raise output_os_error(out, e) from e
        stage.publish()
    inexact = [n for n, _, _, f in rows if f != 1.0 and math.frexp(f)[0] != 0.5]
    return target, {"alpha": alpha, "modules": len(rows),
                    "rescaled": sum(1 for r in rows if r[3] != 1.0), "inexact": inexact}


# --------------------------------------------------------------------------- reading

def read(ckpt: Checkpoint, base: str | None = None) -> LoraAdapter:
    """A GGUF LoRA adapter → LoraAdapter. Named as llama.cpp names tensors, unless ``base`` is
    a transformers model, whose names it then gets (q/k rows un-permuted, experts fused)."""
    assert ckpt.gguf is not None
    where = str(ckpt.source or ckpt.path)
    alpha = gguf_alpha(ckpt)
    arch = ckpt.gguf.architecture or "llama"
    ad = LoraAdapter(source_format="gguf", naming="gguf",
                     metadata={"general.architecture": arch})
    for mod, d in gguf_pairs(ckpt).items():
        A, B = (ckpt.load(d[p]).to(torch.float32) if ckpt.tensors[d[p]].dtype not in (
            "F32", "F16", "BF16") else ckpt.load(d[p]) for p in ("lora_a", "lora_b"))
        if mod == "token_embd":  # rows gathered by token: PEFT's A transposed
            layout, A = "embedding", A.T.contiguous()
        else:
            layout = "experts" if A.dim() == 3 else "linear"
        r = int(A.shape[1] if layout == "experts" else A.shape[0])
        # llama.cpp: scale = alpha / r, and alpha 0 means scale 1
        ad.add(LoraModule(mod, A, B, alpha if alpha else float(r), False, layout))
    if base:
        b = open_checkpoint(base)
        if b.gguf is None:  # a transformers model: its names, its layout
            if b.config is None:
                raise FormatError(f"{base}: has no config.json to name the GGUF adapter's "
                                  "modules by")
            a = Arch.of_config(b.config, base)
            if a.name != arch:
                raise FormatError(f"{where} is a {arch} adapter, but {base} is a {a.name} "
                                  "model: is it the model the adapter was made for?")
            ad = from_gguf(ad, a, b, b.config.get("model_type"))
            # what a PEFT config of it says: the base it is for and that base's task
            ad.task_type = ad.task_type or task_type_for(b.config.get("architectures"))
            ad.base_model = ad.base_model or base
    return ad


FORMAT = Format("gguf", "one .gguf file", ".gguf", "adapter.gguf",
                lambda ckpt: ckpt.gguf is not None, read, write, lossy,
                keep)
