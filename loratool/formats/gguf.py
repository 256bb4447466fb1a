"""llama.cpp GGUF LoRA adapters (written; llama.cpp's ``--lora`` loads them).

Tensors ``<gguf tensor name>.lora_a`` [r, in] and ``.lora_b`` [out, r] (numpy order; GGUF
stores the dimensions reversed), named by llama.cpp's HF→GGUF map (``blk.0.attn_q.weight``);
metadata ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and the
base model (``general.base_model.*``) when it is a Hub id. Token-embedding LoRA is
``token_embd.weight.lora_a`` [vocab, r] (PEFT's lora_embedding_A transposed: llama.cpp gathers
its rows by token) and ``.lora_b`` [dim, r].

llama.cpp scales every module by ``alpha / r`` with one alpha for the file and r read from the
tensor shape. loratool picks the alpha that most modules need (``scale · r``) and multiplies
``lora_b`` of every other module by ``scale · r / alpha`` — exact when that factor is a power of
two, one rounding otherwise (reported). Llama-family q/k projections are stored by llama.cpp
with their rows permuted for its RoPE layout; ``lora_b`` rows are permuted the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .base import Format, held, losses

# HF model_type → (gguf arch name, whether q/k rows are permuted as llama.cpp's converter does)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
          "qwen3": ("qwen3", False)}


def lossy(ad: Any) -> list[str]:
    """What a GGUF adapter cannot hold."""
    return losses(ad, [("DoRA magnitude", lambda m: m.magnitude is not None),
                       ("lora_B bias", lambda m: m.bias is not None),
                       ("conv LoRA", lambda m: m.layout == "conv"),
                       ("mixture-of-experts parameters", lambda m: bool(m.experts))],
                  full=True)


def keep(ad: Any) -> Any:
    return held(ad, full=False, bias=False, magnitude=False,
                layouts=("linear", "fan_in_fan_out", "embedding"))


def _for_tied_base(ad: Any) -> Any:
    """A base that ties its head to the token embeddings: llama.cpp's model has one tensor,
    token_embd, for both, and looks LoRA pairs up by tensor name, so it would apply a token
    embedding LoRA to the output layer too, in a layout that does not fit."""
    import copy

    from ..adapter import drop_head_mirror

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


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row permutation (its converter's ``LlamaModel.permute``)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def plan(ad: Any, config: dict[str, Any]) -> tuple[float, list[tuple[str, Any, Any, float]]]:
    """The file's alpha and, per module, (gguf name, lora_a, lora_b, factor baked into b)."""
    import torch

    try:
        import gguf  # noqa: F811
    except ImportError as e:
        raise FormatError("writing GGUF needs the gguf package: pip install gguf"
                          ) from e
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise FormatError(f"GGUF adapters for model_type {model_type!r} are not supported yet "
                          f"(supported: {', '.join(ARCHES)})")
    arch_name, permute = ARCHES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    if config.get("tie_word_embeddings"):
        ad = _for_tied_base(ad)
    need = Counter(m.scale * m.rank for m in ad.modules.values())
    alpha = need.most_common(1)[0][0] if need else 1.0
    rows = []
    for m in sorted(ad.modules.values(), key=lambda m: m.key):
        name = tmap.get_name(m.name + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise FormatError(f"module {m.name}: no llama.cpp tensor name for it in the "
                              f"{arch_name} map")
        a, b = m.A, m.B
        if m.layout == "embedding":
            a = a.T  # llama.cpp gathers lora_a's rows by token id
        factor = m.scale * m.rank / alpha
        if factor != 1.0:
            b = (b.to(torch.float32) * factor).to(b.dtype)
        if permute and m.name.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif permute and m.name.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        rows.append((name, a, b, factor))
    return alpha, rows


def _base_model(w: Any, spec: str | None) -> None:
    """``general.base_model.*`` as llama.cpp's converter writes it, for a Hub id only (a local
    path means nothing to whoever loads the file)."""
    from ..sources import hub_repo_of

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


def write(ad: Any, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``out`` (a .gguf file; a folder gets ``adapter.gguf``) atomically. ``base``
    (path or Hub id) gives the architecture and llama.cpp's tensor names."""
    from ..checkpoint import open_checkpoint

    if not base:
        raise FormatError("a GGUF adapter needs --base BASE (a model folder or Hub id with "
                          "config.json): llama.cpp names tensors by architecture")
    config = open_checkpoint(base).config
    if config is None:
        raise FormatError(f"{base}: has no config.json, which --format gguf needs (llama.cpp "
                          "names tensors by architecture): give a transformers model folder")
    import gguf
    import numpy as np
    import torch

    from ..staging import Stage, output_os_error

    alpha, rows = plan(ad, config)
    target = out if out.suffix == ".gguf" else out / "adapter.gguf"
    # a .gguf file, or a folder holding adapter.gguf: the same stage as every output
    with Stage(out, inputs, force, file=target.name if target is out else None) as stage:
        assert stage.tmp is not None
        try:
            w = gguf.GGUFWriter(str(stage.tmp / target.name), ARCHES[config["model_type"]][0])
            w.add_string("general.type", "adapter")
            w.add_string("adapter.type", "lora")
            w.add_float32("adapter.lora.alpha", float(alpha))
            _base_model(w, ad.base_model)
            for name, a, b, _ in rows:
                for suffix, t in ((".lora_a", a), (".lora_b", b)):
                    # bf16 is widened to f32 (exact); f16 and f32 are kept as they are
                    keep = t.dtype in (torch.float16, torch.float32)
                    arr = t.detach().cpu().to(t.dtype if keep else torch.float32)
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


FORMAT = Format("gguf", "one .gguf file", ".gguf", "adapter.gguf", None, None, write, lossy,
                keep)
