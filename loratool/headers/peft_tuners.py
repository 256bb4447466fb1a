"""PEFT's tuners other than LoRA, from their headers alone: which ``peft_type`` values are read
(AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT), the tensor names each saves, the checks on their
shapes, and what ``inspect`` shows of each module (type, rank or block size, parameters).
Never imports torch; ``model.tuners`` and ``formats.peft_tuners`` hold the math and reading.

Keys are ``base_model.model.<module>.<part>`` (the adapter's name taken out), the parts:

- AdaLoRA ``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r];
- IA³ ``ia3_l``: [1, in] on a feedforward layer's inputs, else [out, 1] on its outputs;
- LoHa ``hada_w1_a`` … and LoKr ``lokr_w1`` …: LyCORIS' names, LyCORIS' math;
- VeRA ``vera_lambda_b`` [out], ``vera_lambda_d`` [r], and ``base_model.vera_A`` [r, max in]
  / ``base_model.vera_B`` [max out, r] shared by every module;
- OFT ``oft_R.weight`` [blocks, b(b−1)/2]; BOFT ``boft_R`` [factors, blocks, b, b] and
  ``boft_s`` [out, 1].

Example::
    facts, modules = describe_tuner(ckpt.tensors, cfg, "adapter/")
    modules[0].type, modules[0].block_size, modules[0].params
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

from ..errors import FormatError
from ..reports.inspect import AdapterFacts, ModuleEntry
from ..units import natural_key
from .checks import check_fields, pattern_match
from .kohya import LOHA, LOKR, lyco_factors, lyco_rank, lyco_shape
from .safetensors import TensorInfo

PEFT_PREFIX = "base_model.model."
Shape = tuple[int, ...]

# peft_type → the kind loratool reads it as
TUNERS = {"ADALORA": "adalora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr", "VERA": "vera",
          "OFT": "oft", "BOFT": "boft"}
TUNER_NAMES = {"adalora": "AdaLoRA", "ia3": "IA³", "loha": "LoHa", "lokr": "LoKr",
               "vera": "VeRA", "oft": "OFT", "boft": "BOFT"}
PARTS: dict[str, tuple[str, ...]] = {
    "adalora": ("lora_A", "lora_E", "lora_B"), "ia3": ("ia3_l",), "loha": LOHA, "lokr": LOKR,
    "vera": ("vera_lambda_b", "vera_lambda_d"), "oft": ("oft_R.weight",),
    "boft": ("boft_R", "boft_s")}
SHARED = {"vera": ("vera_A", "vera_B")}  # saved once, as base_model.vera_A
# a key with one of these that no part of the kind matches is another tuner's, not a full
# tensor (modules_to_save)
MARKS = ("lora_", "hada_", "lokr_", "ia3_", "vera_", "oft_", "boft_")
# PEFT types that are not read, and why (docs/formats.md says the same)
NOT_READ = {
    "PROMPT_TUNING": "it adds virtual tokens to the input, no weight to merge",
    "P_TUNING": "it adds virtual tokens to the input, no weight to merge",
    "PREFIX_TUNING": "it adds keys and values to attention, no weight to merge",
    "MULTITASK_PROMPT_TUNING": "it adds virtual tokens to the input, no weight to merge",
    "ADAPTION_PROMPT": "it adds a gated prompt to attention, no weight to merge",
    "CPT": "it adds virtual tokens to the input, no weight to merge",
    "POLY": "it mixes LoRA skills per task at run time; no single weight to merge",
    "XLORA": "it mixes LoRA experts per token at run time; no single weight to merge",
    "LN_TUNING": "it trains copies of the norm layers: merge is replacing them (not read yet)",
}


def kind_of(cfg: Mapping[str, object]) -> str | None:
    """The tuner kind of a PEFT config (None for LoRA)."""
    t = str(cfg.get("peft_type", "LORA"))
    return TUNERS.get(t)


def not_read(cfg: Mapping[str, object], where: str) -> FormatError:
    """The one line for a PEFT type that is not read."""
    t = str(cfg.get("peft_type"))
    why = NOT_READ.get(t, "its change is not one of the forms loratool merges (yet)")
    read = ", ".join(["LORA", *TUNERS])
    return FormatError(f"{where}: peft_type {t!r} is not read: {why}; loratool reads PEFT "
                       f"types {read}")


def group(names: Iterable[str], kind: str, where: str
          ) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """(modules: {module: {part: key}}, shared: {part: key}, full tensor keys) of a tuner's
    tensor names."""
    parts = PARTS[kind]
    pattern = re.compile(r"^(?P<module>.+)\.(?P<part>" + "|".join(map(re.escape, parts)) + ")$")
    modules: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    full: list[str] = []
    for key in names:
        short = key[len("base_model."):] if key.startswith("base_model.") else key
        if short in SHARED.get(kind, ()):
            shared[short] = key
            continue
        rel = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = pattern.match(rel)
        if m is None:
            if any(mark in rel for mark in MARKS):
                raise FormatError(f"{where}: {key!r} is not a tensor of a {TUNER_NAMES[kind]} "
                                  "adapter as PEFT saves it (another PEFT version, or a part "
                                  "loratool does not read, such as an embedding's)")
            full.append(key)
            continue
        modules.setdefault(m.group("module"), {})[m.group("part")] = key
    for part in SHARED.get(kind, ()):
        if modules and part not in shared:
            raise FormatError(f"{where}: the VeRA adapter has no {part} (saved with "
                              "save_projection=False): re-save it with save_projection=True "
                              "so that its shared projections travel with it")
    return modules, shared, full


def check_shapes(kind: str, name: str, shapes: Mapping[str, Shape], where: str) -> None:
    """The tensors a module of ``kind`` needs are there and fit together: else one line."""
    at = f"{where}: module {name} ({TUNER_NAMES[kind]})"
    if kind in ("loha", "lokr"):
        lyco_shape(kind, dict(shapes), at)
        return
    need = [p for p in PARTS[kind] if p not in shapes]
    if need:
        raise FormatError(f"{at} has no {', '.join(need)}; the adapter file is incomplete")
    s = shapes
    ok = True
    if kind == "adalora":
        A, E, B = s["lora_A"], s["lora_E"], s["lora_B"]
        ok = len(A) == 2 and len(B) == 2 and E == (A[0], 1) and B[1] == A[0]
    elif kind == "ia3":
        ok = len(s["ia3_l"]) == 2 and 1 in s["ia3_l"]
    elif kind == "vera":
        ok = len(s["vera_lambda_b"]) == 1 and len(s["vera_lambda_d"]) == 1
    elif kind == "oft":
        w = s["oft_R.weight"]
        b = _block(w[1]) if len(w) == 2 else 0
        ok = b > 1 and b * (b - 1) // 2 == w[1]
    elif kind == "boft":
        R, sc = s["boft_R"], s["boft_s"]
        ok = len(R) == 4 and R[2] == R[3] and min(R) > 0 and len(sc) == 2 and sc[1] == 1
    if not ok:
        listed = ", ".join(f"{n} {list(v)}" for n, v in sorted(s.items()))
        raise FormatError(f"{at}: its tensors do not fit together ({listed}); the adapter "
                          "is damaged")


def _block(n_elements: int) -> int:
    return int(round((1 + math.sqrt(1 + 8 * n_elements)) / 2))


def tuner_params(kind: str, shapes: Mapping[str, Shape]) -> int:
    """Trainable values of one module (VeRA's shared projections not counted)."""
    return sum(math.prod(v) for n, v in shapes.items() if n not in SHARED.get(kind, ()))


def factors_text(kind: str, shapes: Mapping[str, Shape], settings: Mapping[str, object]
                 ) -> str:
    """One line per module for ``inspect``: what is stored and how it acts."""
    def dims(n: str) -> str:
        return "×".join(map(str, shapes[n]))

    if kind in ("loha", "lokr"):
        return lyco_factors(kind, dict(shapes))
    if kind == "adalora":
        return f"{dims('lora_B')} · diag({shapes['lora_E'][0]}) · {dims('lora_A')}"
    if kind == "ia3":
        return f"l {dims('ia3_l')} on the " + (
            "inputs" if shapes["ia3_l"][0] == 1 else "outputs (and bias)")
    if kind == "vera":
        return f"λb {dims('vera_lambda_b')}, λd {dims('vera_lambda_d')} on shared projections"
    if kind == "oft":
        w = shapes["oft_R.weight"]
        how = (f"Cayley–Neumann, {settings.get('num_cayley_neumann_terms', 5)} terms"
               if settings.get("use_cayley_neumann", True) else "Cayley")
        shared = ", shared" if settings.get("block_share") else ""
        return f"{w[0]} blocks {_block(w[1])}×{_block(w[1])} ({how}{shared})"
    R = shapes["boft_R"]
    return f"{R[0]} butterfly × {R[1]} blocks {R[2]}×{R[3]} (Cayley), s {dims('boft_s')}"


# the settings each tuner's math reads, and what they must be (null: PEFT's default)
SETTINGS = {
    "adalora": {"lora_alpha": "number", "init_r": "positive int"},
    "loha": {"r": "positive int", "alpha": "number", "rank_pattern": "positive ints by name",
             "alpha_pattern": "numbers by name"},
    "oft": {"coft": "bool", "eps": "number", "block_share": "bool", "use_cayley_neumann": "bool",
            "num_cayley_neumann_terms": "positive int"},
}
SETTINGS["lokr"] = SETTINGS["loha"]
MAX_NEUMANN_TERMS = 1000  # PEFT's default is 5; each term is one product per block


def module_settings(kind: str, name: str, cfg: Mapping[str, object], where: str,
                    shapes: Mapping[str, Shape] | None = None) -> dict[str, object]:
    """What the config says of one module: AdaLoRA's scaling and ranknum, LoHa's and LoKr's
    r and alpha (``rank_pattern``/``alpha_pattern``; r checked against ``shapes``' rank),
    OFT's rotation settings."""
    check_fields(dict(cfg), SETTINGS.get(kind, {}), where)
    if kind == "oft":
        eps, terms = cfg.get("eps") or 0, cfg.get("num_cayley_neumann_terms") or 1
        if float(eps) < 0:  # type: ignore[arg-type]
            raise FormatError(f"{where}: OFT's eps must be 0 or more, not {eps}; fix it in "
                              "adapter_config.json")
        if int(terms) > MAX_NEUMANN_TERMS:  # type: ignore[call-overload]
            raise FormatError(f"{where}: num_cayley_neumann_terms {terms} is more than "
                              f"{MAX_NEUMANN_TERMS}; fix it in adapter_config.json")
    out: dict[str, object] = {"fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False))}
    if kind == "adalora":
        alpha = _number(cfg, "lora_alpha", where, 8)
        init_r = _number(cfg, "init_r", where, 12)
        out["scaling"], out["ranknum"] = (alpha if alpha > 0 else None), init_r
    elif kind in ("loha", "lokr"):
        r = _pattern(cfg.get("rank_pattern") or {}, name, _number(cfg, "r", where, 8), where)
        a = _pattern(cfg.get("alpha_pattern") or {}, name, _number(cfg, "alpha", where, 8),
                     where)
        out["r"], out["alpha"] = r, a
        have = lyco_rank(kind, dict(shapes)) if shapes is not None else 0
        if have and r != have:  # PEFT scales by alpha / r; its LoKr's whole sides have no rank
            raise FormatError(f"{where}: module {name}: the config gives r {r} and its "
                              f"{TUNER_NAMES[kind]} factors have rank {have}; fix r or "
                              "rank_pattern in adapter_config.json")
    elif kind == "oft":
        for k, default in (("coft", False), ("eps", 6e-5), ("block_share", False),
                           ("use_cayley_neumann", True), ("num_cayley_neumann_terms", 5)):
            out[k] = cfg.get(k, default)
    return out


def _number(cfg: Mapping[str, object], key: str, where: str, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FormatError(f"{where}: {key} must be a finite number, got {v!r}")
    return v


def _pattern(patterns: object, name: str, default: float, where: str) -> float:
    if not isinstance(patterns, dict):
        raise FormatError(f"{where}: rank_pattern/alpha_pattern must map names to numbers")
    for k, v in patterns.items():
        if pattern_match(k, name, where):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise FormatError(f"{where}: a pattern gives {name} {v!r}, not a number")
            return v
    return default


def describe_tuner(tensors: Mapping[str, TensorInfo], cfg: Mapping[str, object], where: str
                   ) -> tuple[AdapterFacts, list[ModuleEntry]]:
    """A PEFT tuner adapter's facts and one entry per module, from its config and shapes."""
    kind = kind_of(cfg)
    assert kind is not None
    modules, shared, full = group(tensors, kind, where)
    out = []
    for name in sorted(modules, key=natural_key):
        keys = modules[name]
        shapes = {p: tuple(tensors[k].shape) for p, k in keys.items()}
        check_shapes(kind, name, shapes, where)
        settings = module_settings(kind, name, cfg, where, shapes)
        out.append(_entry(kind, name, shapes, settings, tensors[next(iter(keys.values()))].dtype))
    target = cfg.get("target_modules")
    facts = AdapterFacts(
        peft_type=str(cfg.get("peft_type")), base_model=cfg.get("base_model_name_or_path"),
        base_model_revision=cfg.get("revision"), task_type=cfg.get("task_type"),
        target_modules=sorted(map(str, target)) if isinstance(target, list) else target,
        r=cfg.get("init_r", cfg.get("r")), lora_alpha=cfg.get("lora_alpha", cfg.get("alpha")),
        use_rslora=False, use_dora=False, modules_to_save=cfg.get("modules_to_save"),
        full_tensors=[k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k for k in full])
    return facts, out


def _entry(kind: str, name: str, s: dict[str, Shape], settings: dict[str, object], dtype: str
           ) -> ModuleEntry:
    """One module's row: rank (AdaLoRA, LoHa, LoKr, VeRA) or block size (OFT, BOFT)."""
    rank, block, alpha, scale = 0, None, None, 1.0
    n_in: int | None = None
    n_out: int | None = None
    if kind == "adalora":
        rank, n_in, n_out = s["lora_A"][0], s["lora_A"][1], s["lora_B"][0]
        alpha = settings["scaling"]
        scale = float(alpha if alpha is not None else rank) / (float(settings["ranknum"])
                                                               + 1e-5)  # type: ignore[arg-type]
    elif kind in ("loha", "lokr"):
        shape = lyco_shape(kind, dict(s), name)
        rank = int(settings["r"]) if kind == "lokr" else lyco_rank(kind, dict(s))  # type: ignore
        alpha = float(settings["alpha"])  # type: ignore[arg-type]
        scale = alpha / rank if rank else 0.0
        n_out, n_in = shape[0], math.prod(shape[1:])
    elif kind == "ia3":
        l_shape = s["ia3_l"]
        n_in, n_out = (l_shape[1], None) if l_shape[0] == 1 else (None, l_shape[0])
    elif kind == "vera":
        rank, n_out = s["vera_lambda_d"][0], s["vera_lambda_b"][0]
    elif kind == "oft":
        w = s["oft_R.weight"]
        block = _block(w[1])
        n_in = None if settings.get("block_share") else w[0] * block
    else:
        R = s["boft_R"]
        block, n_in, n_out = R[2], R[1] * R[2], s["boft_s"][0]
    return ModuleEntry(name=name, type=kind, rank=int(rank), alpha=alpha, scale=scale,
                       layout="linear", factors=factors_text(kind, s, settings),
                       in_features=n_in, out_features=n_out, dtype=dtype,
                       block_size=block, params=tuner_params(kind, s))
