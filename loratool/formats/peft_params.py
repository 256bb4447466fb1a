"""PEFT's parameter wrappers of ``target_parameters`` (LoRA on fused mixture-of-experts
parameters), read into the adapter model: which keys adapt which parameter, and the factors of
rank r·E as one factor pair per expert. The naming rules are ``loratool.headers.moe`` and
``loratool.headers.adapters``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from ..errors import FormatError
from ..headers import moe
from ..headers.adapters import pattern_value
from ..model import experts
from ..model.adapter import LoraModule

if TYPE_CHECKING:
    import torch


class FactorParts(TypedDict, total=False):
    """One PEFT module's tensors as read from its keys: the factors, the embedding flag,
    and DoRA's magnitude and lora_B's bias when present."""

    A: torch.Tensor
    B: torch.Tensor
    emb: bool  # lora_embedding_A/B rather than lora_A/B
    magnitude: torch.Tensor
    bias: torch.Tensor


def parameter_modules(parts: dict[str, FactorParts], cfg: dict[str, object]) -> set[str]:
    """Rename the parameter wrappers' keys in ``parts`` to the parameters they adapt; the
    names of the fused expert parameters among them."""

    tp = cfg.get("target_parameters") or []
    if not tp:
        return set()
    renamed = moe.peft_modules(list(parts), list(tp))
    for old, new in renamed.items():
        if new != old:
            if new in parts:
                raise FormatError(f"module {new} is adapted twice (as a module and as a "
                                  "parameter)")
            parts[new] = parts.pop(old)
    fused = {n for n in renamed.values() if moe.FUSED.match(n)}
    for n in fused:  # gate_up_proj and down_proj of one module: nested as PEFT nests them
        mod, _, param = n.rpartition(".")
        if param == "gate_up_proj" and f"{mod}.down_proj" in fused:
            gu, dn = parts[n], parts[f"{mod}.down_proj"]
            moe.check_pair((gu["B"].shape[0], gu["A"].shape[1]),
                               (dn["B"].shape[0], dn["A"].shape[1]), mod)
    return fused


def experts_module(name: str, A: torch.Tensor, B: torch.Tensor, cfg: dict[str, object],
                   default_alpha: float, rslora: bool, where: str, component: str | None
                   ) -> LoraModule:
    """A fused expert parameter's module from PEFT's factors of rank r·E."""

    alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, default_alpha, where)
    rank = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"], where)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or A.shape[0] % rank:
        raise FormatError(f"{where}: parameter {name} has factors of {A.shape[0]} rows, not a "
                          f"multiple of its rank {rank!r} (r / rank_pattern): the config and "
                          "the weights do not belong together")
    A3, B3 = experts.from_peft(A, B, A.shape[0] // rank)
    return LoraModule(name, A3, B3, float(alpha), rslora, "experts", component=component)
