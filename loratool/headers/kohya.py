"""kohya / sd-scripts files and the LyCORIS modules they carry, from their headers: key
patterns, names, the shape of each module's ΔW, and the description ``inspect`` shows. The
format reader (``loratool.formats.kohya``) loads tensors into the structure built here.

One safetensors file; keys ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_``,
``lora_te2_``) with the module path's dots turned into underscores, then ``.lora_down.weight``
[r, in(, kh, kw)], ``.lora_up.weight`` [out, r(, 1, 1)], ``.alpha`` (0-d) and, from LyCORIS,
``.dora_scale`` [out, 1, …], or a LyCORIS type's own tensors (``hada_*``, ``lokr_*``,
``diff``). Scale is alpha / r; a missing or zero alpha means alpha = r. Underscored names are
ambiguous (``layers_0`` or ``layers.0``?): loratool records the real names in the header
(``loratool.modules``) when it writes, and otherwise they resolve against a base.

Example::

    groups = stems(ckpt)                            # {stem: {part: TensorInfo}}
    facts, modules = describe(ckpt)
"""

from __future__ import annotations

import math
import re
import struct
from collections import Counter
from typing import Collection

from ..errors import FormatError
from ..reports.inspect import AdapterFacts, ModuleEntry
from ..units import natural_key
from .checkpoint import Checkpoint
from .checks import parse_json
from .safetensors import TensorInfo, read_tensor_bytes

NAMES_KEY = "loratool.modules"  # {stem: [component, module name, layout]}
# LyCORIS wrapping a model itself (``lycoris.create_lycoris``, as trainers of LLMs and
# diffusion transformers use it) names its modules ``lycoris_<module path, dots as _>``: one
# model, no pipeline component
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_")
PREFIX_COMPONENT: dict[str, str | None] = {
    "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lycoris_": None}
KEY = re.compile(r"^(?P<stem>(?:lora_(?:unet|te\d?)|lycoris)_[^.]+)\.(?P<part>.+)$")
LORA_PARTS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"}
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
KINDS = {"loha": LOHA, "lokr": LOKR, "full": FULL}
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full"}
# LyCORIS algorithms whose ΔW is not a sum of products of stored factors (or that change
# norm layers): named when refused
UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "diag-OFT", "boft": "BOFT",
               "a1.weight": "GLoRA", "w_norm": "norm-layer", "b_norm": "norm-layer",
               "weight": "IA3", "on_input": "IA3"}
Shape = tuple[int, ...]


def is_kohya(ckpt: Checkpoint) -> bool:
    """Whether a checkpoint's keys are kohya's (``lora_unet_*``, ``lora_te_*`` …) or
    LyCORIS' own (``lycoris_*``)."""
    return any(n.startswith(PREFIXES) for n in ckpt.tensors)


def split_stem(stem: str) -> tuple[str, str]:
    """``lora_te2_text_model_x`` → (``lora_te2_``, ``text_model_x``)."""
    for p in sorted(PREFIX_COMPONENT, key=len, reverse=True):
        if stem.startswith(p):
            return p, stem[len(p):]
    raise FormatError(f"unknown kohya key prefix in {stem!r}")


def recorded_names(meta: dict[str, str], where: str) -> dict[str, list[str | None]]:
    """The real module names loratool records when it writes a kohya file (taken out of
    ``meta``): ``{stem: [component, name, layout]}``."""
    names = parse_json(meta.pop(NAMES_KEY, "{}"), where, f"header metadata {NAMES_KEY}")
    if not isinstance(names, dict) or not all(
            isinstance(v, list) and len(v) == 3 and (v[0] is None or isinstance(v[0], str))
            and isinstance(v[1], str) and v[2] in ("linear", "conv", "fan_in_fan_out",
                                                   "embedding") for v in names.values()):
        raise FormatError(f"{where}: header metadata {NAMES_KEY} must map each module to "
                          "[component, name, layout]; the file was changed by hand or damaged")
    return names


def stems(ckpt: Checkpoint) -> dict[str, dict[str, TensorInfo]]:
    """The file's tensors by module stem: lora_down, lora_up, alpha, dora_scale, or a LyCORIS
    type's own tensors; an unknown key or an unsupported LyCORIS type is a clear error."""
    where = str(ckpt.source or ckpt.path)
    known = LORA_PARTS | {p for parts in KINDS.values() for p in parts}
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in ckpt.tensors.items():
        m = KEY.match(key)
        part = m.group("part") if m else ""
        if m and part in UNSUPPORTED:
            raise FormatError(f"{where}: {key!r} is a LyCORIS {UNSUPPORTED[part]} module, "
                              "which loratool does not read (it reads LoRA, LoCon, LoHa, LoKr "
                              "and full modules)")
        if not m or part not in known:
            raise FormatError(f"{where}: unknown key pattern {key!r} (expected lora_unet_*/"
                              "lora_te*_*/lycoris_* with lora_down/lora_up/alpha, or LyCORIS "
                              "hada_*/lokr_*/diff)")
        groups.setdefault(m.group("stem"), {})[part] = info
    return groups


def kind_of(stem: str, parts: Collection[str], where: str) -> str:
    """``lora``, or the one LyCORIS type whose tensors a stem holds."""
    kinds = [k for k, names in KINDS.items() if set(parts) & set(names)]
    if not kinds:
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            have = "lora_down" if "lora_down.weight" in parts else "lora_up"
            if "lora_down.weight" not in parts and "lora_up.weight" not in parts:
                have = "only an alpha"
            raise FormatError(f"{where}: module {stem} has {have} but not both lora_down and "
                              "lora_up; the file is incomplete")
        return "lora"
    if len(kinds) > 1 or set(parts) & {"lora_down.weight", "lora_up.weight"}:
        raise FormatError(f"{where}: module {stem} mixes the tensors of several LyCORIS "
                          f"types ({', '.join(sorted(parts))}); the file is damaged")
    return kinds[0]


def scalar(ckpt: Checkpoint, info: TensorInfo) -> float:
    """The value of a one-value tensor (kohya's alpha), read from its bytes (a Hub file is
    downloaded first)."""
    info = ckpt.local_info(info.name)
    raw = bytes(read_tensor_bytes(info))
    if info.dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw[:2])[0]
    fmt = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h",
           "I8": "<b", "U8": "<B", "BOOL": "<?"}.get(info.dtype)
    if fmt is None:
        raise FormatError(f"{info.file}: {info.name} is {info.dtype}, not a number an alpha "
                          "can be")
    return float(struct.unpack(fmt, raw[:struct.calcsize(fmt)])[0])


def alpha(ckpt: Checkpoint, parts: dict[str, TensorInfo], stem: str, rank: int) -> float:
    """A module's alpha: its one-value tensor; missing or zero means alpha = rank."""
    where = str(ckpt.source or ckpt.path)
    info = parts.get("alpha")
    if info is not None and math.prod(info.shape) != 1:
        raise FormatError(f"{where}: {stem}.alpha must be one number, has shape "
                          f"{list(info.shape)}")
    value = scalar(ckpt, info) if info is not None else 0.0
    if not math.isfinite(value):
        raise FormatError(f"{where}: {stem}.alpha is {value}, not a finite number")
    return value if value != 0.0 else float(rank)


def check_dora_scale(parts: dict[str, TensorInfo], stem: str, out: int, where: str) -> None:
    info = parts.get("dora_scale")
    if info is not None and (info.shape[:1] != (out,) or math.prod(info.shape) != out):
        raise FormatError(f"{where}: {stem}.dora_scale has shape {list(info.shape)}: only "
                          "the per-output form [out, 1, …] (LyCORIS wd_on_out) is read")


def lyco_shape(kind: str, shapes: dict[str, Shape], where: str) -> Shape:
    """The shape of a LyCORIS module's ΔW from its factors' shapes (LyCORIS' products), or a
    clear error when they do not fit together."""
    missing = _missing(kind, shapes)
    if missing:
        raise FormatError(f"{where} lacks {', '.join(missing)}; the file is incomplete")
    try:
        if kind == "full":
            return shapes["diff"]
        if kind == "loha":
            halves = [_loha_half(shapes, i) for i in (1, 2)]
            if halves[0] != halves[1]:
                raise ValueError
            return halves[0]
        w1 = shapes.get("lokr_w1") or _matmul(shapes["lokr_w1_a"], shapes["lokr_w1_b"])
        w2 = shapes.get("lokr_w2") or _lokr_w2(shapes)
        if len(w1) != 2:
            raise ValueError
        w1 = w1 + (1,) * (len(w2) - len(w1))
        shape = tuple(a * b for a, b in zip(w1, w2)) + tuple(w2[len(w1):])
        if 0 in shape:  # an empty Kronecker factor: no layer has an empty weight
            raise ValueError
        return shape
    except (ValueError, KeyError, IndexError):
        listed = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise FormatError(f"{where}: the factors do not fit together ({listed})") from None


def _missing(kind: str, p: dict[str, Shape]) -> list[str]:
    need = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "lokr": (), "full": ("diff",)}[kind]
    missing = [n for n in need if n not in p]
    if kind == "lokr":
        missing += [f"lokr_w{i} or lokr_w{i}_a/_b" for i in (1, 2)
                    if f"lokr_w{i}" not in p and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(p)]
    if kind == "loha" and ("hada_t1" in p) != ("hada_t2" in p):
        missing.append("hada_t2" if "hada_t1" in p else "hada_t1")
    return missing


def _matmul(a: Shape, b: Shape) -> Shape:
    """The shape of ``a.reshape(a[0], -1) @ b.reshape(b[0], -1)``."""
    if math.prod(a[1:]) != b[0]:
        raise ValueError
    return (a[0], math.prod(b[1:]))


def _loha_half(p: dict[str, Shape], i: int) -> Shape:
    a, b, t = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"], p.get(f"hada_t{i}")
    if t is None:
        return _matmul(a, b)
    if len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
        raise ValueError  # einsum("i j ..., j r, i p -> p r ...", t, b, a)
    return (a[1], b[1], *t[2:])


def _lokr_w2(p: dict[str, Shape]) -> Shape:
    a, b, t = p["lokr_w2_a"], p["lokr_w2_b"], p.get("lokr_t2")
    if t is None:  # (a @ b.reshape(r, -1)).reshape(-1, o, *k) for b [r, o, *k]
        if len(a) != 2 or a[1] != b[0]:
            raise ValueError
        return (a[0], *b[1:])
    if len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
        raise ValueError  # einsum("i j ..., i p, j r -> p r ...", t, a, b)
    return (a[1], b[1], *t[2:])


def lyco_rank(kind: str, shapes: dict[str, Shape]) -> int:
    """LyCORIS' ``dim``: the rank of each factor pair (LoHa), of the factored side (LoKr; 0
    when both sides are whole), 0 for a full module."""
    if kind == "loha":
        return int(shapes["hada_w1_b"][0])
    if kind == "lokr":
        side = shapes.get("lokr_w1_b", shapes.get("lokr_w2_b"))
        return int(side[0]) if side is not None else 0
    return 0


def lyco_scale(alpha: float | None, rank: int) -> float:
    """alpha / dim (a missing or zero alpha means dim); 1 for a LoKr with both sides whole
    and for full modules, as LyCORIS defines it."""
    if not rank or not alpha:
        return 1.0
    return float(alpha) / rank


def lyco_factors(kind: str, shapes: dict[str, Shape]) -> str:
    """The factor shapes in one line: ``(8×4 · 4×8) ⊙ (8×4 · 4×8)``, ``2×2 ⊗ 4×4``."""
    def dims(name: str) -> str:
        s = shapes.get(name)
        return "×".join(map(str, s)) if s is not None else ""

    if kind == "loha":
        t = " Tucker" if "hada_t1" in shapes else ""
        return f"({dims('hada_w1_a')}·{dims('hada_w1_b')}) ⊙ ({dims('hada_w2_a')}·" \
               f"{dims('hada_w2_b')}){t}"
    if kind == "lokr":
        w1 = dims("lokr_w1") or f"{dims('lokr_w1_a')}·{dims('lokr_w1_b')}"
        w2 = dims("lokr_w2") or f"{dims('lokr_w2_a')}·{dims('lokr_w2_b')}" + (
            " Tucker" if "lokr_t2" in shapes else "")
        return f"{w1} ⊗ {w2}"
    return f"diff {dims('diff')}" + (" + diff_b" if "diff_b" in shapes else "")


def module_name(stem: str, names: dict[str, list[str | None]]
                ) -> tuple[str | None, str, str | None]:
    """(component, name, layout) of a stem as recorded, or its component and the underscored
    rest (layout None) when the file records no names."""
    if stem in names:
        component, name, layout = names[stem]
        return component, name, layout
    prefix, rest = split_stem(stem)
    return PREFIX_COMPONENT[prefix], rest, None


def describe(ckpt: Checkpoint) -> tuple[AdapterFacts, list[ModuleEntry]]:
    """A kohya file's facts and one entry per module (LoRA first, then LyCORIS), as ``inspect``
    shows them: names as recorded, else underscored."""
    where = str(ckpt.source or ckpt.path)
    names = recorded_names(dict(ckpt.metadata), where)
    lora: list[ModuleEntry] = []
    lyco: list[ModuleEntry] = []
    unresolved = False
    components: set[str] = set()
    for stem in sorted((g := stems(ckpt)), key=natural_key):
        parts = g[stem]
        kind = kind_of(stem, parts, where)
        component, name, recorded_layout = module_name(stem, names)
        unresolved = unresolved or stem not in names
        if component:
            components.add(component)
        key = f"{component}.{name}" if component else name
        (lora if kind == "lora" else lyco).append(
            _lora_entry(ckpt, key, stem, parts, recorded_layout) if kind == "lora" else
            _lyco_entry(ckpt, key, stem, kind, parts))
    mods = lora + lyco
    ranks = Counter(m.rank for m in mods)
    alphas = Counter(float(m.alpha) if m.alpha else float(m.rank) for m in mods)
    facts = AdapterFacts(
        peft_type="LYCORIS" if lyco else "LORA", base_model=None, base_model_revision=None,
        task_type=None, r=ranks.most_common(1)[0][0] if ranks else 8,
        lora_alpha=alphas.most_common(1)[0][0] if alphas else 8.0,
        target_modules=sorted({m.name.rsplit(".", 1)[-1] for m in mods}), use_rslora=False,
        use_dora=any(m.dora for m in lora), modules_to_save=None, full_tensors=[],
        components=sorted(components), unresolved_names=unresolved)
    return facts, mods


def _lora_entry(ckpt: Checkpoint, key: str, stem: str, parts: dict[str, TensorInfo],
                recorded: str | None) -> ModuleEntry:
    where = str(ckpt.source or ckpt.path)
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank, n_in, kernel = down.shape[0], down.shape[1], list(down.shape[2:])
    mid = parts.get("lora_mid.weight")
    if mid is not None:  # Tucker LoCon: the kernel lives in lora_mid
        if len(mid.shape) < 3 or len(down.shape) != len(mid.shape) or \
                mid.shape[:2] != (down.shape[0],) * 2:
            raise FormatError(f"{where}: {stem}.lora_mid has shape {list(mid.shape)}, which "
                              f"does not fit lora_down {list(down.shape)}")
        kernel = list(mid.shape[2:])
    layout = recorded or ("conv" if kernel else "linear")
    a = alpha(ckpt, parts, stem, rank)
    check_dora_scale(parts, stem, up.shape[0], where)
    return ModuleEntry(name=key, type="lora", rank=rank, alpha=a,
                       scale=a / rank if rank else 0.0, layout=layout, in_features=n_in,
                       out_features=up.shape[0], dora="dora_scale" in parts,
                       dtype=down.dtype, kernel=kernel or None)


def _lyco_entry(ckpt: Checkpoint, key: str, stem: str, kind: str, parts: dict[str, TensorInfo]
                ) -> ModuleEntry:
    where = str(ckpt.source or ckpt.path)
    shapes = {n: i.shape for n, i in parts.items() if n not in ("alpha", "dora_scale")}
    for n, i in parts.items():
        if n not in ("alpha", "dora_scale") and not i.dtype.startswith(("F", "BF")):
            raise FormatError(f"{where}: {key}: {kind} module: {n} is not floating-point "
                              "data; the adapter is damaged")
    shape = lyco_shape(kind, shapes, f"{where}: {key}: {kind} module")
    rank = lyco_rank(kind, shapes)
    a = alpha(ckpt, parts, stem, 0) if "alpha" in parts else None
    a = a or None
    check_dora_scale(parts, stem, shape[0], where)
    flat = kind != "full" and len(shape) == 2  # a linear's ΔW, or a conv's stored flat
    return ModuleEntry(name=key, type=kind, rank=rank, alpha=a, scale=lyco_scale(a, rank),
                       layout="2-D" if flat else ("conv" if len(shape) > 2 else "linear"),
                       factors=lyco_factors(kind, shapes),
                       in_features=math.prod(shape[1:]) if len(shape) > 1 else None,
                       out_features=shape[0], dora="dora_scale" in parts,
                       bias="diff_b" in shapes, dtype=next(iter(parts.values())).dtype)
