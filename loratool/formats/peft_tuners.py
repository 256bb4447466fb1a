"""PEFT adapters of its other tuners (AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT) read into the
one adapter model: LoHa and LoKr as LyCORIS modules (``model.lyco``: PEFT's math is LyCORIS',
with PEFT's alpha / r), the others as ``model.tuners.TunerModule``. They sit in
``LoraAdapter.lyco`` beside LyCORIS' modules: what is not LoRA, merged through its dense ΔW
or its multiplicative edit, and turned into LoRA by ``convert`` at a rank policy.

Example::
    ad = read_tuner(open_checkpoint("ia3-adapter/"), "adapter/")
    [m.kind for m in ad.lyco.values()]          # ["ia3", "ia3", …]
"""

from __future__ import annotations

import torch

from ..errors import FormatError
from ..headers.checkpoint import Checkpoint
from ..headers.peft_tuners import PEFT_PREFIX, check_shapes, group, kind_of, module_settings
from ..model.adapter import LoraAdapter
from ..model.lyco import LycoModule
from ..model.tuners import TunerModule
from ..units import natural_key


def read_tuner(ckpt: Checkpoint, where: str) -> LoraAdapter:
    """A PEFT folder whose ``peft_type`` is one of the tuners → LoraAdapter."""
    cfg = ckpt.adapter_config or {}
    kind = kind_of(cfg)
    assert kind is not None
    modules, shared, full_keys = group(ckpt.tensors, kind, where)
    shared_t = {p: ckpt.load(k) for p, k in shared.items()}  # one tensor, every module
    ad = LoraAdapter(base_model=cfg.get("base_model_name_or_path"),  # type: ignore[arg-type]
                     base_revision=cfg.get("revision"),  # type: ignore[arg-type]
                     source_format="peft", task_type=cfg.get("task_type"),  # type: ignore
                     peft_config=dict(cfg), source_modules=set(modules))
    for key in full_keys:  # modules_to_save; an adapted embedding's saved base layer
        rel = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        ad.full[rel.replace(".base_layer.", ".")] = ckpt.load(key)
    for name in sorted(modules, key=natural_key):
        keys = modules[name]
        shapes = {p: tuple(ckpt.tensors[k].shape) for p, k in keys.items()}
        check_shapes(kind, name, shapes, where)
        parts = {p: ckpt.load(k) for p, k in keys.items()}
        settings = module_settings(kind, name, cfg, where, shapes)
        if kind in ("loha", "lokr"):
            r, alpha = settings["r"], settings["alpha"]
            ad.add(LycoModule(name, kind, parts, float(alpha), dim=int(r)))  # type: ignore
            continue
        if kind == "adalora" and settings["scaling"] is None:  # lora_alpha ≤ 0: PEFT uses r
            settings["scaling"] = float(parts["lora_A"].shape[0])
        if kind == "vera":
            parts.update(shared_t)
            _check_vera(name, parts, where)
        ad.add(TunerModule(name, kind, parts, settings))
    return ad


def _check_vera(name: str, parts: dict[str, torch.Tensor], where: str) -> None:
    r, out = parts["vera_lambda_d"].shape[0], parts["vera_lambda_b"].shape[0]
    A, B = parts["vera_A"], parts["vera_B"]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r or B.shape[0] < out:
        raise FormatError(f"{where}: module {name} (VeRA): λd has {r} values and λb {out}, "
                          f"which the shared vera_A {list(A.shape)} and vera_B "
                          f"{list(B.shape)} do not fit; the adapter is damaged")
