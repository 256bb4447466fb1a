"""llama.cpp GGUF LoRA adapters (written; llama.cpp's ``--lora`` loads them).

Tensors ``<gguf tensor name>.lora_a`` [r, in] and ``.lora_b`` [out, r] (numpy order; GGUF
stores the dimensions reversed), named by llama.cpp's HF→GGUF map (``blk.0.attn_q.weight``);
metadata ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``.

llama.cpp scales every module by ``alpha / r`` with one alpha for the file and r read from the
tensor shape. loratool picks the alpha that most modules need (``scale · r``) and multiplies
``lora_b`` of every other module by ``scale · r / alpha`` — exact when that factor is a power of
two, one rounding otherwise (reported). Llama-family q/k projections are stored by llama.cpp
with their rows permuted for its RoPE layout; ``lora_b`` rows are permuted the same way.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import FormatError

# HF model_type → (gguf arch name, whether q/k rows are permuted as llama.cpp's converter does)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
          "qwen3": ("qwen3", False)}


def lossy(ad: Any) -> list[str]:
    """What a GGUF adapter cannot hold."""
    out = []
    for label, pred in (("DoRA magnitude", lambda m: m.magnitude is not None),
                        ("lora_B bias", lambda m: m.bias is not None),
                        ("embedding LoRA", lambda m: m.layout == "embedding"),
                        ("conv LoRA", lambda m: m.layout == "conv")):
        hit = [m.key for m in ad.modules.values() if pred(m)]
        if hit:
            out.append(f"{label} on {len(hit)} modules ({hit[0]} …)")
    if ad.full:
        out.append(f"{len(ad.full)} full tensors (modules_to_save)")
    return out


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
    need = Counter(m.scale * m.rank for m in ad.modules.values())
    alpha = need.most_common(1)[0][0] if need else 1.0
    rows = []
    for m in sorted(ad.modules.values(), key=lambda m: m.key):
        name = tmap.get_name(m.name + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise FormatError(f"module {m.name}: no llama.cpp tensor name for it in the "
                              f"{arch_name} map")
        a, b = m.A, m.B
        factor = m.scale * m.rank / alpha
        if factor != 1.0:
            b = (b.to(torch.float32) * factor).to(b.dtype)
        if permute and m.name.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif permute and m.name.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        rows.append((name, a, b, factor))
    return alpha, rows


def write(ad: Any, out: Path, config: dict[str, Any], *, force: bool = False,
          inputs: list[Path] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``out`` (a .gguf file; a folder gets ``adapter.gguf``) atomically."""
    import gguf
    import numpy as np
    import torch

    from ..writer import check_output, move_into_place, remove_created, temp_beside

    alpha, rows = plan(ad, config)
    target = out if out.suffix == ".gguf" else out / "adapter.gguf"
    check_output(out, inputs or [], force)
    tmp, created = temp_beside(out)
    try:
        w = gguf.GGUFWriter(str(tmp / target.name), ARCHES[config["model_type"]][0])
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        if ad.base_model:
            w.add_string("general.base_model.0.repo_url", f"https://huggingface.co/{ad.base_model}")
        for name, a, b, _ in rows:
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                # bf16 is widened to f32 (exact); f16 and f32 are kept as they are
                keep = t.dtype in (torch.float16, torch.float32)
                arr = t.detach().cpu().to(t.dtype if keep else torch.float32).contiguous().numpy()
                w.add_tensor(name + suffix, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        # a .gguf file, or a folder holding adapter.gguf: the same swap as every output
        move_into_place(tmp / target.name if target is out else tmp, out, inputs or [])
        if target is out:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise
    inexact = [n for n, _, _, f in rows if f != 1.0 and math.frexp(f)[0] != 0.5]
    return target, {"alpha": alpha, "modules": len(rows),
                    "rescaled": sum(1 for r in rows if r[3] != 1.0), "inexact": inexact}
