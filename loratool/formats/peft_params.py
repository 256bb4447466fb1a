"""PEFT's per-module rules: ``rank_pattern``/``alpha_pattern`` matching, and the parameter
wrappers of ``target_parameters`` (LoRA on fused mixture-of-experts parameters), for reading
PEFT adapters (:mod:`.peft`) and describing them from their headers.
"""

from __future__ import annotations

from typing import Any

from ..errors import FormatError
from ..headers.checks import pattern_match
from ..model import experts
from ..model.adapter import LoraModule


def pattern_value(patterns: dict[str, Any], module: str, default: Any, where: Any = "") -> Any:
    """PEFT's rule: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)`` wins
    (matched with a time limit: see ``validate.pattern_match``)."""

    if not isinstance(patterns, dict):
        raise FormatError(f"{where}: rank_pattern/alpha_pattern must map names to numbers, got "
                          f"{type(patterns).__name__}")
    for key, value in patterns.items():
        if pattern_match(key, module, where):
            return value
    return default


def parameter_modules(parts: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> set[str]:
    """Rename the parameter wrappers' keys in ``parts`` to the parameters they adapt; the
    names of the fused expert parameters among them."""

    tp = cfg.get("target_parameters") or []
    if not tp:
        return set()
    renamed = experts.peft_modules(list(parts), list(tp))
    for old, new in renamed.items():
        if new != old:
            if new in parts:
                raise FormatError(f"module {new} is adapted twice (as a module and as a "
                                  "parameter)")
            parts[new] = parts.pop(old)
    fused = {n for n in renamed.values() if experts.FUSED.match(n)}
    for n in fused:  # gate_up_proj and down_proj of one module: nested as PEFT nests them
        mod, _, param = n.rpartition(".")
        if param == "gate_up_proj" and f"{mod}.down_proj" in fused:
            gu, dn = parts[n], parts[f"{mod}.down_proj"]
            experts.check_pair((gu["B"].shape[0], gu["A"].shape[1]),
                               (dn["B"].shape[0], dn["A"].shape[1]), mod)
    return fused


def experts_module(name: str, A: Any, B: Any, cfg: dict[str, Any], default_alpha: float,
                    rslora: bool, where: str, component: str | None) -> Any:
    """A fused expert parameter's module from PEFT's factors of rank r·E."""

    alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, default_alpha, where)
    rank = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"], where)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or A.shape[0] % rank:
        raise FormatError(f"{where}: parameter {name} has factors of {A.shape[0]} rows, not a "
                          f"multiple of its rank {rank!r} (r / rank_pattern): the config and "
                          "the weights do not belong together")
    A3, B3 = experts.from_peft(A, B, A.shape[0] // rank)
    return LoraModule(name, A3, B3, float(alpha), rslora, "experts", component=component)


def rename_described(modules: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> None:
    """Header-only: name parameter wrappers by the parameter they adapt (``describe``)."""
    tp = cfg.get("target_parameters") or []
    if not tp:
        return

    for old, new in experts.peft_modules(list(modules), list(tp)).items():
        modules[new] = {**modules.pop(old), "name": new}
        if experts.FUSED.match(new):
            modules[new]["layout"] = "experts"


def experts_rank(mod: dict[str, Any], name: str, rows: int, cfg: dict[str, Any], where: str
                 ) -> tuple[int, int | None]:
    """(rank, experts) of a described module: an experts module's A has rank·E rows."""
    if mod.get("layout") != "experts":
        return rows, None
    r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"), where)
    if isinstance(r, int) and not isinstance(r, bool) and r > 0 and rows % r == 0:
        return r, rows // r
    return rows, None
