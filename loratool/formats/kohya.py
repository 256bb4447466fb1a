"""kohya / sd-scripts LoRA files (also what LyCORIS, ComfyUI and A1111 read), read into the
adapter model and written from it. The file's layout (key patterns, stems, LyCORIS types,
recorded names) is ``loratool.headers.kohya``; here its tensors are loaded, names resolved
against a base (``--base``) where the file does not record them, and files written.

Example::

    ad = read(open_checkpoint("style.safetensors"), base="sdxl-pipeline/")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Collection

import torch

from ..errors import FormatError, LoraToolError, OutsideInputError
from ..formats.base import Format, held, losses
from ..formats.flux_names import is_fused, original_map, split, to_original
from ..formats.sgm_names import (
    UNET_PREFIX,
    from_sgm,
    is_sdxl,
    is_unet,
    single_file_config,
    text_prefix,
    to_sgm,
)
from ..headers.checkpoint import Checkpoint
from ..headers.kohya import (
    NAMES_KEY,
    PREFIX_COMPONENT,
    alpha,
    check_dora_scale,
    is_kohya,
    kind_of,
    recorded_names,
    split_stem,
    stems,
)
from ..headers.paths import is_pipeline
from ..headers.safetensors import TensorInfo, read_safetensors_header
from ..headers.sources import resolve_input
from ..io.tensors import open_checkpoint
from ..io.writer import CheckpointWriter
from ..model.adapter import LoraAdapter, LoraModule, pipeline_folders
from ..model.lyco import LycoModule
from ..numerics import ops
from ..options import Options
from ..units import natural_key


class BaseNames:
    """Underscored kohya names → dotted module names, from a base's tensor names.

    ``base`` is a model folder, file or Hub id; a diffusers pipeline folder (model_index.json)
    resolves each component against its own subfolder. ``single_model``: a transformers
    model has one name space, so its modules get no pipeline component.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.tables: dict[str | None, dict[str, str | None]] = {}
        # Flux transformers: BFL's fused names (underscored) → (diffusers parts, their rows)
        self.flux: dict[str | None, dict[str, tuple[tuple[str, ...], list[int], bool]]] = {}
        target = resolve_input(base)
        self.pipeline = isinstance(target, Path) and is_pipeline(target)
        self.single_model = False
        if self.pipeline:
            for sub in sorted(pipeline_folders(target)):  # type: ignore[arg-type]
                try:
                    ckpt = open_checkpoint(target / sub)  # type: ignore
                except OutsideInputError:
                    raise
                except LoraToolError:
                    continue  # not a weights folder (scheduler/, tokenizer/ …)
                self.tables[sub] = _table(ckpt)
                self.flux[sub] = _flux_table(ckpt)
        else:
            ckpt = open_checkpoint(base)
            self.tables[None] = _table(ckpt)
            self.flux[None] = _flux_table(ckpt)
            self.single_model = bool(ckpt.config and "model_type" in ckpt.config)
            single = _single_file_tables(ckpt.tensors)
            if single:  # a single-file Stable Diffusion checkpoint: per component, as a pipeline
                self.tables, self.pipeline = single, True

    def component(self, component: str | None) -> str | None:
        """kohya's ``lora_unet_`` is the ``transformer`` of a pipeline without a UNet (Flux,
        SD3), and of a Flux transformer given alone."""
        if component == "unet" and ((self.pipeline and "unet" not in self.tables
                                     and "transformer" in self.tables) or self.flux.get(None)):
            return "transformer"
        return component

    def fused(self, component: str | None, underscored: str
              ) -> tuple[tuple[str, ...], list[int], bool] | None:
        """The diffusers modules (and their rows) a BFL-named Flux module holds, or None."""
        component = self.component(component)
        return self.flux.get(component if self.pipeline else None, {}).get(underscored)

    def resolve(self, component: str | None, underscored: str) -> str | None:
        component = self.component(component)
        t = self.tables.get(component if self.pipeline else None)
        if t is None and set(self.tables) == {"unet", "text_encoder"}:  # a single file
            raise FormatError(f"base {self.base} holds no {component} in transformers' layout "
                              "(SDXL's second and SD 2's text encoders are OpenCLIP's in a "
                              "single file, q, k and v fused); merge into the diffusers "
                              "pipeline folder instead")
        if t is None:
            raise FormatError(f"base {self.base} has no component {component}")
        for name in _spellings(component, underscored):
            if name in t and t[name] is None:
                raise FormatError(f"kohya name {underscored} matches several modules of "
                                  f"{self.base}")
            if name in t:
                return t[name]
        return None


def _single_file_tables(names: Collection[str]) -> dict[str | None, dict[str, str | None]]:
    """For a single-file Stable Diffusion checkpoint: the UNet's modules (SGM or diffusers
    underscored names → diffusers names) and the CLIP text encoder's (→ transformers names),
    the names a pipeline folder would give them; empty for other checkpoints."""

    config = single_file_config(names)
    if config is None:
        return {}
    unet: dict[str, str | None] = {}
    te: dict[str, str | None] = {}
    tp = text_prefix(names)
    for n in names:
        if not n.endswith(".weight"):
            continue
        mod = n[: -len(".weight")]
        if mod.startswith(UNET_PREFIX):
            sgm = mod[len(UNET_PREFIX):]
            ours = from_sgm(sgm, config)
            if ours is not None:
                unet[sgm.replace(".", "_")] = unet[ours.replace(".", "_")] = ours
        elif tp is not None and mod.startswith(tp):
            te[mod[len(tp):].replace(".", "_")] = mod[len(tp):]
    return {"unet": unet, "text_encoder": te}


def _flux_table(ckpt: Checkpoint) -> dict[str, tuple[tuple[str, ...], list[int], bool]]:
    """For a diffusers Flux transformer: each BFL module name (underscored) → the diffusers
    modules it holds and their output rows; empty for other models."""

    if not is_fused(ckpt.config):
        return {}
    out = {}
    for orig, (parts, swapped) in original_map(ckpt.config).items():  # type: ignore[arg-type]
        infos = [ckpt.tensors.get(p + ".weight") for p in parts]
        if all(i is not None for i in infos):
            out[orig.replace(".", "_")] = (parts, [int(i.shape[0]) for i in infos],  # type: ignore
                                           swapped)
    return out


def _table(ckpt: Checkpoint) -> dict[str, str | None]:
    """underscored module name → dotted name (None where two dotted names collide); a
    diffusers UNet's modules also under their SGM names (kohya's SDXL files)."""

    t: dict[str, str | None] = {}
    unet = is_unet(ckpt.config)
    for n in ckpt.tensors:
        if n.endswith(".weight"):
            mod = n[: -len(".weight")]
            sgm = to_sgm(mod, ckpt.config) if unet else None  # type: ignore[arg-type]
            # single files of Flux/SD3 saved by ComfyUI put the model under this prefix
            bare = mod[len(UNET_PREFIX):] if mod.startswith(UNET_PREFIX) else None
            for key in (mod.replace(".", "_"), sgm.replace(".", "_") if sgm else None,
                        bare.replace(".", "_") if bare else None):
                if key:
                    t[key] = None if key in t and t[key] != mod else mod
    return t


def read(ckpt: Checkpoint, base: str | None = None) -> LoraAdapter:
    """A kohya LoRA file → LoraAdapter. Names come from loratool's header record, else from
    the base (``--base``), else they stay underscored (``unresolved``)."""
    where = str(ckpt.source or ckpt.path)
    meta = dict(ckpt.metadata)
    names = recorded_names(meta, where)
    resolver = BaseNames(base) if base else None
    ad = LoraAdapter(source_format="kohya", metadata=meta)
    groups = stems(ckpt)
    for stem in sorted(groups, key=natural_key):
        m = _module(ckpt, stem, groups[stem], names, resolver, ad.unresolved, where)
        fused = resolver.fused(m.component, split_stem(stem)[1]) \
            if resolver is not None and stem not in names else None
        if fused is not None:  # a BFL-named Flux module: diffusers' parts, exactly
            if not isinstance(m, LoraModule):
                raise FormatError(f"{where}: {stem} is a LyCORIS module on a fused Flux weight; "
                                  "loratool splits only LoRA modules into diffusers' parts")
            for part in split(m, *fused):
                ad.add(part)
        else:
            ad.add(m)
    return ad


TEXT_MODEL = "text_model_"  # CLIP's wrapper, as sd-scripts names every text encoder module
CLIP_MODULES = ("encoder.layers.", "embeddings.", "final_layer_norm")


def _spellings(component: str | None, underscored: str) -> list[str]:
    """A kohya name, then for a text encoder its other spelling: sd-scripts always writes
    CLIP's ``text_model_`` wrapper, transformers 5 saves ``CLIPTextModel`` without it (and
    ``CLIPTextModelWithProjection`` with it), and diffusers loads both."""
    if not (component or "").startswith("text_encoder"):
        return [underscored]
    if underscored.startswith(TEXT_MODEL):
        return [underscored, underscored[len(TEXT_MODEL):]]
    return [underscored, TEXT_MODEL + underscored]


def kohya_te_name(component: str | None, name: str) -> str:
    """A text encoder's CLIP module as sd-scripts names it, with ``text_model.``."""
    if (component or "").startswith("text_encoder") and name.startswith(CLIP_MODULES):
        return "text_model." + name
    return name


def _name(stem: str, down: torch.Tensor | None, names: dict[str, list[str | None]],
          resolver: BaseNames | None, unresolved: list[str], where: str
          ) -> tuple[str | None, str, str]:
    """(component, module name, layout) of a stem: recorded, resolved against the base, or
    left underscored."""
    prefix, rest = split_stem(stem)
    layout = "conv" if down is not None and down.dim() > 2 else "linear"
    if stem in names:
        component, name, layout = names[stem]
        return component, name, layout
    component = PREFIX_COMPONENT[prefix]
    if resolver is not None:
        component = resolver.component(component)
    if resolver is not None and resolver.fused(component, rest) is not None:
        return component, rest, layout  # named by its parts (see read)
    name = resolver.resolve(component, rest) if resolver else None
    if resolver is not None and name is None:
        raise FormatError(f"{where}: module {stem}: no module {rest!r} (dots for "
                          f"underscores) in the base {resolver.base}; is it the model this "
                          "adapter was made for?")
    if name is None:
        unresolved.append(stem)
        name = rest
    elif resolver is not None and resolver.single_model:
        component = None
    return component, name, layout


def _module(ckpt: Checkpoint, stem: str, parts: dict[str, TensorInfo],
            names: dict[str, list[str | None]], resolver: BaseNames | None, unresolved: list[str],
            where: str) -> LoraModule | LycoModule:
    kind = kind_of(stem, parts, where)
    if kind != "lora":
        component, name, _ = _name(stem, None, names, resolver, unresolved, where)
        tensors = {k: ckpt.load(i.name) for k, i in parts.items()
                   if k not in ("alpha", "dora_scale")}
        a = alpha(ckpt, parts, stem, 0) if "alpha" in parts else None
        m = LycoModule(name, kind, tensors, a or None, component=component)
        check_dora_scale(parts, stem, m.shape[0], where)
        m.magnitude = _magnitude(ckpt, parts)
        return m
    down, up = ckpt.load(parts["lora_down.weight"].name), ckpt.load(parts["lora_up.weight"].name)
    if "lora_mid.weight" in parts:  # Tucker LoCon: the same ΔW as a plain conv LoRA of rank r
        mid = ckpt.load(parts["lora_mid.weight"].name)
        if mid.dim() < 3 or down.dim() != mid.dim() or mid.shape[:2] != (down.shape[0],) * 2:
            raise FormatError(f"{where}: {stem}.lora_mid has shape {list(mid.shape)}, which "
                              f"does not fit lora_down {list(down.shape)}")
        down = ops.tucker_fold(mid.float(), down.float())  # float32: exact to rounding
    component, name, layout = _name(stem, down, names, resolver, unresolved, where)
    check_dora_scale(parts, stem, up.shape[0], where)
    return LoraModule(name, down, up, alpha(ckpt, parts, stem, down.shape[0]), False, layout,
                      _magnitude(ckpt, parts), None, component)


def _magnitude(ckpt: Checkpoint, parts: dict[str, TensorInfo]) -> torch.Tensor | None:
    """LyCORIS' ``dora_scale`` [out, 1, …] as DoRA's per-row magnitude (its shape checked)."""
    info = parts.get("dora_scale")
    return None if info is None else ckpt.load(info.name).reshape(-1)


def lossy(ad: LoraAdapter) -> list[str]:
    """What a kohya file cannot hold."""
    return losses(ad, [("embedding LoRA", lambda m: m.layout == "embedding"),
                       ("lora_B bias", lambda m: m.bias is not None),
                       ("mixture-of-experts parameters", lambda m: bool(m.experts))],
                  full=True)


def keep(ad: LoraAdapter) -> LoraAdapter:
    return held(ad, full=False, bias=False, layouts=("linear", "fan_in_fan_out", "conv"))


def write(ad: LoraAdapter, out: Path, *, force: bool = False, inputs: list[Path] | None = None,
          note: str = "", base: str | None = None, options: Options | None = None) -> Path:
    """One kohya safetensors file: ``out`` if it ends in .safetensors, else
    ``out/lora.safetensors``."""

    comps = {m.component for m in ad.modules.values()}
    te = "lora_te1_" if "text_encoder_2" in comps else "lora_te_"
    sgm = _sgm_names(ad, base)
    modules, bfl = _flux_modules(ad, base)
    prefix_of = {None: "lora_unet_", "unet": "lora_unet_", "transformer": "lora_unet_",
                 "text_encoder": te, "text_encoder_2": "lora_te2_",
                 "text_encoder_3": "lora_te3_"}
    names: dict[str, list[str | None]] = {}
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = [], []
    for m in sorted(modules, key=lambda m: natural_key(m.key)):
        if m.component not in prefix_of:
            raise FormatError(f"module {m.key}: component {m.component!r} has no kohya prefix")
        stem = prefix_of[m.component] + sgm.get(m.key, kohya_te_name(m.component, m.name)
                                                ).replace(".", "_")
        if stem in names:
            raise FormatError(f"modules {names[stem][1]} and {m.name} both become {stem}")
        names[stem] = [m.component, m.name, m.layout]
        # kohya has no rsLoRA: restate alpha so that alpha / r is the module's scale
        alpha = m.alpha if not m.rslora else m.scale * m.rank
        tensors[stem + ".lora_down.weight"] = m.A
        tensors[stem + ".lora_up.weight"] = m.B
        tensors[stem + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if m.magnitude is not None:
            tensors[stem + ".dora_scale"] = m.magnitude.reshape(-1, *[1] * (m.A.dim() - 1))
        ranks.append(m.rank)
        alphas.append(alpha)
    meta = {k: v for k, v in ad.metadata.items() if k != NAMES_KEY}
    meta.setdefault("ss_network_module", "networks.lora")
    if ranks:
        meta.setdefault("ss_network_dim", str(max(set(ranks), key=ranks.count)))
        meta.setdefault("ss_network_alpha", f"{max(set(alphas), key=alphas.count):g}")
    if ad.base_model:
        meta.setdefault("ss_base_model_version", ad.base_model)
    # BFL-named Flux modules hold several diffusers modules: read back with --base, not by name
    names = {s: v for s, v in names.items() if (f"{v[0]}.{v[1]}" if v[0] else v[1]) not in bfl}
    meta[NAMES_KEY] = json.dumps(names, separators=(",", ":"))
    w, target = CheckpointWriter.file_or_folder(out, "lora.safetensors", inputs=inputs,
                                                force=force, metadata=meta, options=options)
    with w:
        for k, t in tensors.items():
            w.add(k, t)
    return target


# BFL's Flux modules outside the blocks: diffusers' kohya-Flux converter (0.42) leaves them
# out of what it loads, without a word
DIFFUSERS_DROPS = re.compile(r"^lora_unet_(img_in|txt_in|time_in|vector_in|guidance_in|"
                             r"final_layer)(_|$)")


def _write_told(ad: LoraAdapter, out: Path, *, force: bool = False,
                inputs: list[Path] | None = None, note: str = "", base: str | None = None,
                options: Options | None = None) -> tuple[Path, dict[str, object] | None]:
    """write, and what a consumer will not load of what was written (read back from the
    file's header): the Flux modules diffusers' kohya loader drops."""
    target = write(ad, out, force=force, inputs=inputs, note=note, base=base, options=options)
    infos, _ = read_safetensors_header(target)
    stems = sorted({stem for stem in (i.name.split(".")[0] for i in infos)
                    if DIFFUSERS_DROPS.match(stem)}, key=natural_key)
    return target, ({"diffusers_drops": stems} if stems else None)


def _base_model(base: str | None, sub: str) -> Checkpoint | None:
    """The model of ``--base`` that ``sub`` names: that folder of a pipeline, else the base
    itself; None without a base or when it cannot be opened (names then stay diffusers')."""

    if not base:
        return None
    try:
        return open_checkpoint(str(Path(base) / sub) if is_pipeline(base) else base)
    except LoraToolError:
        return None


def _flux_modules(ad: LoraAdapter, base: str | None) -> tuple[list[LoraModule], set[str]]:
    """The modules to write: a Flux transformer's fused and named as BFL (and sd-scripts)
    names them when ``--base`` is a Flux transformer or pipeline; else as they are."""

    mods = list(ad.modules.values())
    ckpt = _base_model(base, "transformer")
    if ckpt is None or not is_fused(ckpt.config):
        return mods, set()
    flux = [m for m in mods if m.component in ("transformer", "unet", None)]
    fused = to_original(flux, ckpt.config, ckpt.tensors)  # type: ignore[arg-type]
    if fused is None:
        return mods, set()
    taken = {id(m) for m in flux}
    return [m for m in mods if id(m) not in taken] + fused[0], fused[1]


def _sgm_names(ad: LoraAdapter, base: str | None) -> dict[str, str]:
    """SGM names for the UNet modules of an SDXL adapter, as sd-scripts names them, when the
    base (``--base``) has an SDXL UNet: its config numbers the blocks. Empty (diffusers names,
    which diffusers and ComfyUI read too) without a base, or when a module has no SGM name."""

    unet = [m for m in ad.modules.values() if m.component in ("unet", None)]
    ckpt = _base_model(base, "unet") if unet else None
    if ckpt is None or not is_sdxl(ckpt.config):
        return {}
    names = {m.key: to_sgm(m.name, ckpt.config) for m in unet}  # type: ignore[arg-type]
    return {} if None in names.values() else names  # type: ignore[return-value]


FORMAT = Format("kohya", "one .safetensors file", ".safetensors", "lora.safetensors",
                is_kohya, read, _write_told, lossy, keep)
