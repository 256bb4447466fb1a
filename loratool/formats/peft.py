"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(embeddings: ``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r], no ``.weight``).
Scale is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern``
and ``alpha_pattern`` override per module with PEFT's matching rule (:func:`pattern_value`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..checkpoint import Checkpoint, natural_key

PREFIX = "base_model.model."
_PARTS = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B"
                    r"|lora_magnitude_vector)(?:\.(?P<adapter>[^.]+))?(?:\.(?P<leaf>weight|bias))?$")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """The factor in front of B@A: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """Header-only facts about a PEFT adapter: config summary and one entry per module.

    Example: ``describe(open_checkpoint("adapter/"))["modules"][0]["scale"]``.
    """
    cfg = ckpt.adapter_config or {}
    rslora = bool(cfg.get("use_rslora", False))
    dora = bool(cfg.get("use_dora", False))
    default_alpha = cfg.get("lora_alpha", cfg.get("r", 8))
    modules: dict[str, dict[str, Any]] = {}
    full: list[str] = []
    for name, info in ckpt.tensors.items():
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        m = _PARTS.match(key)
        if not m:
            full.append(key)  # modules_to_save and other full tensors
            continue
        mod = modules.setdefault(m.group("module"), {"name": m.group("module")})
        part, leaf = m.group("part"), m.group("leaf")
        if part in ("lora_A", "lora_embedding_A") and leaf != "bias":
            mod["rank"] = info.shape[0]
            mod["in_features"] = info.shape[1] if len(info.shape) > 1 else None
            mod["dtype"] = info.dtype
            if part == "lora_embedding_A":
                mod["layout"] = "embedding"
            elif len(info.shape) > 2:
                mod["layout"] = "conv"
                mod["kernel"] = list(info.shape[2:])
        elif part in ("lora_B", "lora_embedding_B"):
            if leaf == "bias":
                mod["bias"] = True
            else:
                mod["out_features"] = info.shape[0]
        elif part == "lora_magnitude_vector":
            mod["dora"] = True
    out = []
    for mod_name in sorted(modules, key=natural_key):
        mod = modules[mod_name]
        rank = int(mod.get("rank", pattern_value(cfg.get("rank_pattern", {}), mod_name,
                                                 cfg.get("r", 0))))
        alpha = float(pattern_value(cfg.get("alpha_pattern", {}), mod_name, default_alpha))
        layout = mod.get("layout") or ("fan_in_fan_out" if cfg.get("fan_in_fan_out")
                                       else "linear")
        entry = {"name": mod_name, "rank": rank, "alpha": alpha,
                 "scale": lora_scale(alpha, rank, rslora), "layout": layout,
                 "in_features": mod.get("in_features"), "out_features": mod.get("out_features"),
                 "rslora": rslora, "dora": bool(mod.get("dora", False)) or dora,
                 "bias": bool(mod.get("bias", False)), "dtype": mod.get("dtype")}
        if "kernel" in mod:
            entry["kernel"] = mod["kernel"]
        out.append(entry)
    target = cfg.get("target_modules")
    return {
        "peft_type": cfg.get("peft_type", "LORA" if cfg else None),
        "base_model": cfg.get("base_model_name_or_path"),
        "base_model_revision": cfg.get("revision"),
        "task_type": cfg.get("task_type"),
        "target_modules": sorted(target) if isinstance(target, list) else target,
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": rslora,
        "use_dora": dora,
        "modules_to_save": cfg.get("modules_to_save"),
        "full_tensors": full,
        "modules": out,
    }
