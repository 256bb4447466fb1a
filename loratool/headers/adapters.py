"""Adapters from their headers alone: which format a checkpoint is, and what each of its modules
is (type, rank, alpha, scale, layout, shapes), reading no tensor data but the one-value alphas
kohya files keep as tensors. What ``inspect`` shows, and the structure the format readers
(``loratool.formats``) load tensors into: the key patterns, names and rules of PEFT, kohya and
LyCORIS, diffusers and GGUF adapters are here, once.

Example::

    kind, fmt = detect(ckpt)                 # ("adapter", "kohya")
    facts, modules = describe(ckpt, fmt)     # the adapter's facts, one entry per module
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Mapping, TypedDict

from ..errors import FormatError
from ..reports.inspect import AdapterFacts, ModuleEntry
from ..units import natural_key
from . import kohya, moe
from .checkpoint import Checkpoint
from .checks import ADAPTER_CONFIG, check_fields, parse_json, pattern_match
from .peft_tuners import PEFT_PREFIX, describe_tuner, kind_of, not_read
from .safetensors import TensorInfo

JsonDict = dict[str, object]  # a config, as JSON holds it


class _Described(TypedDict, total=False):
    """One PEFT module as its tensors' names and shapes describe it (``describe_peft``)."""

    name: str
    rank: int
    in_features: int | None
    out_features: int
    dtype: str
    layout: str
    kernel: list[int]
    bias: bool
    dora: bool


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor in front of B@A: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski
    2023); 0 for rank 0. The one formula: every format and the math use it.

    Example: ``lora_scale(16, 8)`` → 2.0.
    """
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# --------------------------------------------------------------------------- detection

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B",
                   ".lora_down.", ".lora_up.", ".lora_a", ".lora_b", ".hada_w", ".lokr_w")
# the low-rank factors of every format: matrices (or more), never scalars or vectors
FACTOR = re.compile(r"(^|[._])(lora_[ABab]|lora_embedding_[AB]|lora_down|lora_up|lora_mid|"
                    r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t[12])(\.weight)?$")
# the file a folder holds per format (PEFT: its config); a folder with two is ambiguous
DEFAULT_FILES = {"kohya": "lora.safetensors", "diffusers": "pytorch_lora_weights.safetensors",
                 "gguf": "adapter.gguf"}


def detect(ckpt: Checkpoint) -> tuple[str, str]:
    """``(kind, format)``: kind is ``model`` or ``adapter``; format names the layout, read
    from tensor names, header metadata and configs, never from file names alone.

    Example: ``detect(open_checkpoint("adapter/"))`` → ``("adapter", "peft")``.
    """
    if ckpt.gguf is not None:  # llama.cpp says which it is
        return ("adapter" if ckpt.gguf.kv.get("general.type") == "adapter" else "model"), "gguf"
    names = list(ckpt.tensors)
    by_kohya = kohya.is_kohya(ckpt)  # lora_unet_*, lora_te_*: LyCORIS types without down/up too
    if not (ckpt.adapter_config is not None or by_kohya or any(
            m in n for n in names for m in ADAPTER_MARKERS)):
        return "model", ckpt.container
    if by_kohya and any(".lora_A." in n or ".lora_embedding_A" in n for n in names):
        raise FormatError(f"{ckpt.source or ckpt.path}: mixes kohya (lora_down/lora_up) and PEFT "
                          "(lora_A/lora_B) keys; split it into one file per format")
    check_factor_dims(ckpt)
    if by_kohya:
        return "adapter", "kohya"
    return "adapter", "diffusers" if is_diffusers(ckpt) else "peft"


def check_factor_dims(ckpt: Checkpoint) -> None:
    """A factor of fewer than two dimensions is a damaged adapter, said before any reader
    indexes its shape."""
    for name, info in ckpt.tensors.items():
        if len(info.shape) < 2 and FACTOR.search(name):
            raise FormatError(f"{ckpt.source or ckpt.path}: {name} is a {len(info.shape)}-D "
                              f"tensor {list(info.shape)}, but LoRA factors are matrices: the "
                              "adapter is damaged (re-export it)")


def check_one_format(folder: Path) -> None:
    """A folder holding adapters of two formats is ambiguous: refuse rather than guess."""
    names = set(os.listdir(folder))
    found = [f"PEFT ({n})" for n in ("adapter_config.json",) if n in names]
    found += [f"{fmt} ({n})" for fmt, n in DEFAULT_FILES.items()
              if n in names and fmt != "gguf"]
    if any(n.endswith(".gguf") for n in names):
        found.append("GGUF (*.gguf)")
    if len(found) > 1:
        raise FormatError(f"{folder}: holds adapters of several formats ({'; '.join(found)}); "
                          "pass the file to read, or move the others out")


# --------------------------------------------------------------------------- PEFT's rules

# in a key that no PEFT pattern matches: an adapter kind the reader does not know (LoHa, LoKr,
# AdaLoRA …), not a full tensor
UNKNOWN_KIND_MARKS = ("lora_", "hada_", "lokr_")
PEFT_PARTS = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                        r"lora_embedding_B|lora_magnitude_vector)(?:\.(?P<adapter>(?!(?:weight|"
                        r"bias)$)[^.]+))?(?:\.(?P<leaf>weight|bias))?$")


def split_key(key: str) -> tuple[str, str, str | None] | None:
    """``model.x.q_proj.lora_A.weight`` → (``model.x.q_proj``, ``lora_A``, ``weight``)."""
    m = PEFT_PARTS.match(key)
    if not m:
        return None
    return m.group("module"), m.group("part"), m.group("leaf")


def config_number(cfg: JsonDict, key: str, where: str, default: float | None = None) -> float:
    """A numeric config value, or a clear error naming the file and the key."""
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FormatError(f"{where}: {key} must be a finite number, got {v!r}")
    return v


def pattern_value(patterns: object, module: str, default: object, where: object = ""
                  ) -> object:
    """PEFT's rule: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)`` wins
    (matched with a time limit: see ``checks.pattern_match``)."""
    if not isinstance(patterns, dict):
        raise FormatError(f"{where}: rank_pattern/alpha_pattern must map names to numbers, got "
                          f"{type(patterns).__name__}")
    for key, value in patterns.items():
        if pattern_match(key, module, where):
            return value
    return default


def rename_described(modules: dict[str, _Described], cfg: JsonDict) -> None:
    """Name parameter wrappers by the parameter they adapt (``target_parameters``)."""
    tp = cfg.get("target_parameters") or []
    if not tp:
        return
    for old, new in moe.peft_modules(list(modules), list(tp)).items():
        modules[new] = {**modules.pop(old), "name": new}
        if moe.FUSED.match(new):
            modules[new]["layout"] = "experts"


def experts_rank(mod: _Described, name: str, rows: int, cfg: JsonDict, where: str
                 ) -> tuple[int, int | None]:
    """(rank, experts) of a described module: an experts module's A has rank·E rows."""
    if mod.get("layout") != "experts":
        return rows, None
    r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"), where)
    if isinstance(r, int) and not isinstance(r, bool) and r > 0 and rows % r == 0:
        return r, rows // r
    return rows, None


def describe_peft(tensors: Mapping[str, TensorInfo], cfg: JsonDict, where: str,
                  prefix: str = PEFT_PREFIX) -> tuple[AdapterFacts, list[ModuleEntry]]:
    """A PEFT adapter's facts and one entry per module, from its config and tensor shapes."""
    rslora = bool(cfg.get("use_rslora", False))
    dora = bool(cfg.get("use_dora", False))
    default_alpha = config_number(cfg, "lora_alpha", where, 8)  # PEFT's default is 8
    modules: dict[str, _Described] = {}
    full: list[str] = []
    for name, info in tensors.items():
        key = name[len(prefix):] if name.startswith(prefix) else name
        m = PEFT_PARTS.match(key)
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
    rename_described(modules, cfg)
    out = [_peft_module(modules[n], n, cfg, default_alpha, rslora, dora, where)
           for n in sorted(modules, key=natural_key)]
    target = cfg.get("target_modules")
    facts = AdapterFacts(
        peft_type=cfg.get("peft_type", "LORA" if cfg else None),
        base_model=cfg.get("base_model_name_or_path"), base_model_revision=cfg.get("revision"),
        task_type=cfg.get("task_type"),
        target_modules=sorted(map(str, target)) if isinstance(target, list) else target,
        target_parameters=cfg.get("target_parameters") or None, r=cfg.get("r"),
        lora_alpha=cfg.get("lora_alpha"), use_rslora=rslora, use_dora=dora,
        modules_to_save=cfg.get("modules_to_save"), full_tensors=full)
    return facts, out


def _peft_module(mod: _Described, name: str, cfg: JsonDict, default_alpha: float, rslora: bool,
                 dora: bool, where: str) -> ModuleEntry:
    rank, n_experts = experts_rank(mod, name, int(mod.get("rank", 0)), cfg, where)
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, default_alpha, where)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise FormatError(f"{where}: alpha_pattern gives {name} the alpha {alpha!r}, not a "
                          "number")
    alpha = float(alpha)
    want = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"), where)
    if want is not None and rank != want:
        raise FormatError(f"{where}: module {name} has rank {rank} but the config says {want} "
                          "(r / rank_pattern); the config and the weights do not belong "
                          "together")
    layout = mod.get("layout") or ("fan_in_fan_out" if cfg.get("fan_in_fan_out") else "linear")
    return ModuleEntry(name=name, rank=rank, alpha=alpha, scale=lora_scale(alpha, rank, rslora),
                       layout=layout, in_features=mod.get("in_features"),
                       out_features=mod.get("out_features"), rslora=rslora,
                       dora=bool(mod.get("dora", False)) or dora,
                       bias=bool(mod.get("bias", False)), dtype=mod.get("dtype"),
                       kernel=mod.get("kernel"), experts=n_experts)


# --------------------------------------------------------------------------- diffusers

DIFFUSERS_META = "lora_adapter_metadata"  # each component's PEFT config, prefixed
DIFFUSERS_RENAMED = "loratool.components"  # {written prefix: original component or null}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
              "prior", "decoder")


def is_diffusers(ckpt: Checkpoint) -> bool:
    """A diffusers file has no adapter_config.json: its config rides in the header, or every
    key starts with a pipeline component."""
    return ckpt.adapter_config is None and (DIFFUSERS_META in ckpt.metadata or all(
        n.startswith(tuple(c + "." for c in COMPONENTS)) for n in ckpt.tensors))


def diffusers_layout(ckpt: Checkpoint
                     ) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, JsonDict | None],
                                dict[str, str | None], dict[str, str]]:
    """A diffusers file's tensors by component (keys without the prefix), each component's
    PEFT config (None without ``lora_adapter_metadata``: diffusers then takes alpha = r),
    the components' original names, and the rest of the header metadata."""
    where = str(ckpt.source or ckpt.path)
    meta = dict(ckpt.metadata)
    packed = parse_json(meta.pop(DIFFUSERS_META), where, f"header metadata {DIFFUSERS_META}") \
        if DIFFUSERS_META in meta else None
    renamed = parse_json(meta.pop(DIFFUSERS_RENAMED, "{}"), where,
                         f"header metadata {DIFFUSERS_RENAMED}")
    if packed is not None and not isinstance(packed, dict):
        raise FormatError(f"{where}: header metadata {DIFFUSERS_META} must be a JSON object")
    if not isinstance(renamed, dict) or not all(v is None or isinstance(v, str)
                                                for v in renamed.values()):
        raise FormatError(f"{where}: header metadata {DIFFUSERS_RENAMED} must map prefixes to "
                          "component names")
    by_comp: dict[str, dict[str, TensorInfo]] = {}
    for key, info in ckpt.tensors.items():
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS or not rest:
            raise FormatError(f"{where}: unknown key pattern {key!r} (diffusers keys start with "
                              f"one of {', '.join(COMPONENTS)})")
        by_comp.setdefault(comp, {})[rest] = info
    configs: dict[str, JsonDict | None] = {}
    for comp in by_comp:
        if packed is None:
            configs[comp] = None
            continue
        cfg = {k[len(comp) + 1:]: v for k, v in packed.items() if k.startswith(comp + ".")}
        if not cfg:
            raise FormatError(f"{where}: {DIFFUSERS_META} has no config for component {comp}")
        check_fields(cfg, ADAPTER_CONFIG, f"{where}: {DIFFUSERS_META} of {comp}")
        configs[comp] = cfg
    return by_comp, configs, {c: renamed.get(c, c) for c in by_comp}, meta


def _describe_diffusers(ckpt: Checkpoint) -> tuple[AdapterFacts, list[ModuleEntry]]:
    where = str(ckpt.source or ckpt.path)
    by_comp, configs, original, _ = diffusers_layout(ckpt)
    mods: list[ModuleEntry] = []
    base_model = None
    for comp, tensors in by_comp.items():
        cfg = configs[comp]
        facts, entries = describe_peft(tensors, cfg if cfg is not None else {}, where, "")
        if facts.full_tensors:
            raise FormatError(f"{where}: {comp} holds full tensors ({facts.full_tensors[0]}"
                              " …), which diffusers LoRA files do not carry")
        for e in entries:
            if cfg is None:  # diffusers' default without metadata: alpha = r, scale 1
                e = dataclasses.replace(e, alpha=float(e.rank), scale=1.0 if e.rank else 0.0)
            name = f"{original[comp]}.{e.name}" if original[comp] else e.name
            mods.append(dataclasses.replace(e, name=name, type="lora"))
        base_model = base_model or (cfg or {}).get("base_model_name_or_path")
    return _lora_facts(mods, base_model, sorted(c for c in original.values() if c)), mods


def _lora_facts(mods: list[ModuleEntry], base_model: str | None, components: list[str]
                ) -> AdapterFacts:
    """The adapter facts of a format that states no config of its own: the most common rank
    and alpha, the modules' last names."""
    ranks = Counter(m.rank for m in mods)
    alphas = Counter(m.alpha for m in mods)
    return AdapterFacts(
        peft_type="LORA", base_model=base_model, base_model_revision=None, task_type=None,
        r=ranks.most_common(1)[0][0] if ranks else 8,
        lora_alpha=alphas.most_common(1)[0][0] if alphas else 8.0,
        target_modules=sorted({m.name.rsplit(".", 1)[-1] for m in mods}),
        use_rslora=any(m.rslora for m in mods), use_dora=any(m.dora for m in mods),
        modules_to_save=None, full_tensors=[], components=components, unresolved_names=False)


# --------------------------------------------------------------------------- GGUF adapters


def gguf_pairs(ckpt: Checkpoint) -> dict[str, dict[str, str]]:
    """A GGUF adapter's ``lora_a``/``lora_b`` tensors by the module they change (named as
    llama.cpp names tensors); other tensors (norms a converter kept) llama.cpp ignores, and
    so does this."""
    where = str(ckpt.source or ckpt.path)
    pairs: dict[str, dict[str, str]] = {}
    for name in ckpt.tensors:
        stem, _, part = name.rpartition(".")
        if part in ("lora_a", "lora_b") and stem.endswith(".weight"):
            pairs.setdefault(stem[: -len(".weight")], {})[part] = name
    for mod, d in pairs.items():
        if len(d) != 2:
            raise FormatError(f"{where}: {mod} has only {', '.join(d)}; the adapter file is "
                              "incomplete")
    return dict(sorted(pairs.items()))


def gguf_alpha(ckpt: Checkpoint) -> float:
    """``adapter.lora.alpha`` of a GGUF LoRA adapter (0: scale 1, as llama.cpp reads it)."""
    assert ckpt.gguf is not None
    where = str(ckpt.source or ckpt.path)
    kv = ckpt.gguf.kv
    if kv.get("adapter.type") != "lora":
        raise FormatError(f"{where}: a GGUF adapter of type {kv.get('adapter.type')!r}; only "
                          "LoRA adapters (adapter.type = lora) are supported")
    value = kv.get("adapter.lora.alpha", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise FormatError(f"{where}: adapter.lora.alpha is {value!r}, not a number")
    return float(value)


def _describe_gguf(ckpt: Checkpoint) -> tuple[AdapterFacts, list[ModuleEntry]]:
    """Per module: token embeddings (lora_a [vocab, r]), experts (3-D: lora_a [E, r, in],
    lora_b [E, out, r]) or linear (lora_a [r, in], lora_b [out, r])."""
    alpha = gguf_alpha(ckpt)
    mods = []
    for mod, d in gguf_pairs(ckpt).items():
        a, b = ckpt.tensors[d["lora_a"]], ckpt.tensors[d["lora_b"]]
        if mod == "token_embd":  # rows gathered by token: PEFT's A transposed
            rank, n_in, n_out, layout = a.shape[1], a.shape[0], b.shape[0], "embedding"
        elif len(a.shape) == 3:
            rank, n_in, n_out, layout = a.shape[1], a.shape[2], b.shape[1], "experts"
        else:
            rank, n_in, n_out, layout = a.shape[0], a.shape[1], b.shape[0], "linear"
        mod_alpha = alpha if alpha else float(rank)  # llama.cpp: alpha 0 means scale 1
        mods.append(ModuleEntry(
            name=mod, type="lora", rank=rank, alpha=mod_alpha,
            scale=lora_scale(mod_alpha, rank), layout=layout, in_features=n_in,
            out_features=n_out, dtype=a.dtype if a.dtype in ("F32", "F16", "BF16") else "F32",
            experts=a.shape[0] if layout == "experts" else None))
    return _lora_facts(mods, None, []), mods


# --------------------------------------------------------------------------- what inspect shows


def describe(ckpt: Checkpoint, fmt: str) -> tuple[AdapterFacts, list[ModuleEntry]]:
    """An adapter's facts (``inspect --json``'s ``adapter``) and its ``modules``, from its
    headers, for the format ``detect`` found."""
    if fmt == "peft":
        cfg, where = ckpt.adapter_config or {}, str(ckpt.source or ckpt.path)
        if kind_of(cfg) is not None:
            return describe_tuner(ckpt.tensors, cfg, where)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise not_read(cfg, where)
        return describe_peft(ckpt.tensors, cfg, where)
    if fmt == "kohya":
        return kohya.describe(ckpt)
    if fmt == "diffusers":
        return _describe_diffusers(ckpt)
    return _describe_gguf(ckpt)
