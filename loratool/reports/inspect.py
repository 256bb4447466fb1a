"""What ``inspect`` reports: a checkpoint's or adapter's contents from its headers (the
documented ``inspect --json`` object, schema version 1), and with ``--against`` its
tensor-by-tensor comparison with another; and their text.

Example::

    report = loratool.inspect("model/")
    report.total_params, report.kind, print(report.render())
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..units import human_bytes, human_count
from .base import JsonValue, Report, optional
from .text import KIND, LAYER, counts, fold, num, ranks_text, shape_text, span, table


@dataclass
class TensorEntry:
    """One tensor as its header describes it."""

    name: str
    dtype: str
    shape: list[int]
    params: int
    bytes: int
    file: str


@dataclass
class GgufFacts:
    """What llama.cpp's metadata says: the file type, the shape of the model, every key."""

    version: int
    name: JsonValue
    type: JsonValue
    file_type: JsonValue
    context_length: JsonValue
    block_count: JsonValue
    embedding_length: JsonValue
    head_count: JsonValue
    head_count_kv: JsonValue
    expert_count: JsonValue
    lora_alpha: JsonValue
    alignment: int
    metadata: dict[str, JsonValue]


@dataclass
class ModuleEntry:
    """One adapter module: its type (LoRA, a LyCORIS kind or a PEFT tuner), rank (or block
    size), alpha, scale, layout, the shape of the weight it changes (what its tensors tell)."""

    name: str
    type: str | None = optional()  # absent for PEFT LoRA adapters
    rank: int = 0
    alpha: float | None = None
    scale: float = 0.0
    layout: str = "linear"
    factors: str | None = optional()  # LyCORIS: the factor shapes in one line
    in_features: int | None = None
    out_features: int | None = None
    rslora: bool = False
    dora: bool = False
    bias: bool = False
    dtype: str | None = None
    kernel: list[int] | None = optional()
    experts: int | None = optional()
    block_size: int | None = optional()  # OFT, BOFT: the rotation's block size
    params: int | None = optional()  # PEFT's other tuners: trainable values of the module


@dataclass
class AdapterFacts:
    """What an adapter says of itself (a PEFT config, or what the other formats imply)."""

    peft_type: str | None
    base_model: str | None
    base_model_revision: str | None
    task_type: str | None
    target_modules: list[str] | str | None
    r: int | None
    lora_alpha: float | None
    use_rslora: bool
    use_dora: bool
    modules_to_save: list[str] | None
    full_tensors: list[str]
    target_parameters: list[str] | None = None
    components: list[str] | None = optional()
    unresolved_names: bool | None = optional()


@dataclass
class ShapeMismatch:
    name: str
    shape: list[int]
    other_shape: list[int]


@dataclass
class DtypeMismatch:
    name: str
    dtype: str
    other_dtype: str


@dataclass
class ChangedTensor:
    """A tensor whose values differ: ‖B − A‖, ‖A‖, their ratio and the largest |B − A| (null
    where not finite: a zero norm, NaN data)."""

    name: str
    shape: list[int]
    diff_norm: float | None
    norm: float | None
    rel_diff: float | None
    max_abs_diff: float | None


@dataclass
class Comparison:
    """``--against``: every tensor the two checkpoints share, compared."""

    other: str
    only_in_path: list[str]
    only_in_other: list[str]
    shape_mismatch: list[ShapeMismatch]
    dtype_mismatch: list[DtypeMismatch]
    changed: list[ChangedTensor]
    unchanged: int
    compared: int


@dataclass
class InspectReport(Report):
    """The ``inspect --json`` object: fields are only ever added, never renamed."""

    schema: int
    loratool_version: str
    source: str
    path: str
    kind: str  # "model" or "adapter"
    format: str
    container: str
    files: list[str]
    shards: int
    index: str | None
    architecture: str | None
    model_type: str | None
    num_tensors: int
    total_params: int
    total_bytes: int
    dtypes: dict[str, int]
    metadata: dict[str, str]
    filter: list[str] | None
    tensors: list[TensorEntry]
    names_look_like: str | None = optional()  # a filter matched nothing: how names look
    gguf: GgufFacts | None = optional()
    modules: list[ModuleEntry] | None = optional()
    adapter: AdapterFacts | None = optional()
    compare: Comparison | None = optional()

    def render(self, expand: bool = False) -> str:
        """The tables a person reads; every tensor and module with ``expand`` (``--all``)."""
        lines = _head(self)
        if self.kind == "adapter":
            lines += _adapter_lines(self, expand)
        lines += _tensor_lines(self, expand)
        if self.compare is not None:
            lines += ["", render_comparison(self.source, self.compare, expand)]
        return "\n".join(lines)


def _head(r: InspectReport) -> list[str]:
    what = r.architecture or r.model_type or "unknown architecture"
    shard_note = f"{r.shards} file" + ("s" if r.shards != 1 else "")
    if r.index:
        shard_note += f" via {r.index}"
    dts = ", ".join(f"{k} {human_count(v)}" for k, v in r.dtypes.items())
    lines = [f"{r.source}: {r.kind} ({r.format}), {what}",
             f"  {r.num_tensors} tensors, {human_count(r.total_params)} parameters "
             f"({r.total_params:,}), {human_bytes(r.total_bytes)}, {shard_note}",
             f"  dtypes: {dts or 'none'}"]
    if r.gguf is not None:
        lines += _gguf_lines(r.gguf)
    if r.filter:
        lines.append(f"  filter {' '.join(r.filter)}: {len(r.tensors)} tensors match"
                     + (f" (names here look like {r.names_look_like})"
                        if r.names_look_like else ""))
    return lines


def _tensor_lines(r: InspectReport, expand: bool) -> list[str]:
    if not r.tensors:
        return []
    if expand or r.filter:
        rows = [["name", "dtype", "shape", "params"]]
        rows += [[t.name, t.dtype, shape_text(t.shape), human_count(t.params)]
                 for t in r.tensors]
    else:
        rows = [["name", "count", "dtype", "shape", "params"]]
        for name, ts in fold(r.tensors, lambda t: t.name):
            shapes = list(dict.fromkeys(tuple(t.shape) for t in ts))
            text = " | ".join(shape_text(s) for s in shapes[:3])
            if len(shapes) > 3:
                text += f" | … ({len(shapes)} shapes)"
            rows.append([name, f"×{len(ts)}" if len(ts) > 1 else "",
                         "/".join(dict.fromkeys(t.dtype for t in ts)), text,
                         human_count(sum(t.params for t in ts))])
    lines = [""] + table(rows, right={len(rows[0]) - 1})
    if not expand and not r.filter and len(rows) - 1 < len(r.tensors):
        lines.append(f"({len(r.tensors)} tensors in {len(rows) - 1} groups; --all lists "
                     "each, --filter GLOB selects)")
    return lines


def _gguf_lines(g: GgufFacts) -> list[str]:
    """llama.cpp's metadata in one or two lines."""
    facts = [f"GGUF v{g.version}"]
    if g.name:
        facts.append(f"name {g.name!r}")
    if g.file_type is not None:
        facts.append(f"file type {g.file_type}")
    shape = [f"{v} {k}" for k, v in (("layers", g.block_count),
                                      ("embedding", g.embedding_length),
                                      ("heads", g.head_count), ("kv heads", g.head_count_kv),
                                      ("experts", g.expert_count),
                                      ("context", g.context_length)) if v is not None]
    lines = ["  llama.cpp: " + ", ".join(facts)]
    if shape:
        lines.append("  " + ", ".join(shape))
    if isinstance(g.lora_alpha, (int, float)):
        lines.append(f"  adapter.lora.alpha = {g.lora_alpha:g} (scale alpha / rank)")
    lines.append(f"  {len(g.metadata)} metadata keys (--json lists them)")
    return lines


def _adapter_lines(r: InspectReport, expand: bool) -> list[str]:
    a, mods = r.adapter, r.modules or []
    if a is None:
        return []
    base = a.base_model or "not named"
    if a.base_model_revision:
        base += f"@{a.base_model_revision}"
    flags = [f for f, on in (("rsLoRA", a.use_rslora), ("DoRA", a.use_dora)) if on]
    tm = a.target_modules
    if isinstance(tm, list) and len(tm) > 8:  # full module names, one per module
        tm = [f"{len(tm)} modules ({tm[0]} …)"]
    lines = [f"  base model: {base}; peft_type {a.peft_type}; task {a.task_type or '-'}"
             + (f"; {', '.join(flags)}" if flags else ""),
             f"  target modules: {', '.join(tm) if isinstance(tm, list) else tm}"]
    if a.target_parameters:
        lines.append(f"  target parameters: {', '.join(map(str, a.target_parameters))}")
    if a.modules_to_save or a.full_tensors:
        lines.append(f"  full tensors (modules_to_save): {len(a.full_tensors or [])}")
    return lines + (_module_lines(mods, expand) if mods else [])


# PEFT tuners that scale or rotate the weight: they have no rank (OFT and BOFT a block size)
RANKLESS = ("ia3", "oft", "boft")
RANKLESS_KINDS = tuple(KIND[t] for t in RANKLESS)


def _module_lines(mods: list[ModuleEntry], expand: bool) -> list[str]:
    """One row per kind of module, its layers folded (``layers.*.q_proj``) in the order they
    come; ranks, alphas and scales that differ between layers shown as ranges (``expand``:
    one row per module)."""
    lyco = any((m.type or "lora") != "lora" for m in mods)
    ranks = Counter(m.rank for m in mods if m.type not in RANKLESS)
    kinds = Counter(KIND[m.type or "lora"] for m in mods)
    each = (", ".join(f"{k} ×{c}" for k, c in sorted(ranks.items())) if len(ranks) <= 6
            else f"{min(ranks)}–{max(ranks)} ({len(ranks)} different)")
    lines = [f"  {len(mods)} {'LoRA ' if not lyco else ''}modules"
             + (f" ({counts(kinds)})" if lyco else "") + (f"; ranks: {each}" if ranks else "")]
    blocks = any(m.block_size for m in mods)  # OFT, BOFT: a block size, not a rank
    params = any(m.params is not None for m in mods)
    rows = [["module", "count"] + (["type"] if lyco else []) +
            ["rank", "alpha", "scale", "layout", "in→out"] + (["block"] if blocks else []) +
            (["params"] if params else [])]
    grouped: dict[tuple[object, ...], list[ModuleEntry]] = {}
    for m in mods:
        layout = f"{m.layout} ×{m.experts}" if m.experts else m.layout
        key = (m.name if expand else LAYER.sub("*", m.name), layout, m.in_features,
               m.out_features, KIND[m.type or "lora"])
        grouped.setdefault(key, []).append(m)
    for (name, layout, n_in, n_out, kind), ms in grouped.items():
        alphas = sorted({m.alpha for m in ms if m.alpha is not None})
        sizes = sorted({m.block_size for m in ms if m.block_size})
        counted = sorted({m.params for m in ms if m.params is not None})
        rows.append([str(name) if len(ms) > 1 else ms[0].name,
                     f"×{len(ms)}" if len(ms) > 1 else ""] + ([str(kind)] if lyco else []) +
                    [ranks_text(sorted({m.rank for m in ms})) if kind not in RANKLESS_KINDS
                     else "-",
                     span(alphas, "g") if alphas else "-",
                     span(sorted({m.scale for m in ms}), ".4g"), str(layout),
                     f"{n_in or '?'}→{n_out or '?'}"] +
                    ([span(sizes, "d") if sizes else "-"] if blocks else []) +
                    ([span(counted, ",d") if counted else "-"] if params else []))
    first = 3 if lyco else 2
    right = {1, *range(first, first + 3)} | {i for i in (first + 5, first + 6)
                                             if i < len(rows[0])}
    lines += [""] + ["  " + x for x in table(rows, right=right)]
    if any(m.in_features is None or m.out_features is None for m in mods if m.type):
        lines.append("  (?: a side the module's tensors do not tell; the base's weight has it)")
    if any(m.layout == "2-D" for m in mods):
        lines.append("  (2-D: a linear layer's change, or a convolution's that LyCORIS "
                     "stores flat as [out, in·kh·kw]; the base tells which)")
    return lines


def render_comparison(source: str, cmp: Comparison, expand: bool = False) -> str:
    """The text of ``--against``: what differs, and how much each changed tensor did."""
    lines = [f"{source} vs {cmp.other}: {cmp.compared} tensors in both, "
             f"{len(cmp.changed)} changed, {cmp.unchanged} identical"]
    for names, label in ((cmp.only_in_path, f"only in {source}"),
                         (cmp.only_in_other, f"only in {cmp.other}")):
        if names:
            lines.append(f"  {len(names)} {label}: {', '.join(names[:8])}"
                         + (" …" if len(names) > 8 else ""))
    for s in cmp.shape_mismatch:
        lines.append(f"  shape differs: {s.name} {shape_text(s.shape)} vs "
                     f"{shape_text(s.other_shape)}")
    if cmp.dtype_mismatch:
        d = cmp.dtype_mismatch[0]
        lines.append(f"  {len(cmp.dtype_mismatch)} tensors differ in dtype, e.g. {d.name} "
                     f"{d.dtype} vs {d.other_dtype}")
    if not cmp.changed:
        return "\n".join(lines)
    if expand or len(cmp.changed) <= 40:
        rows = [["changed tensor", "shape", "‖ΔW‖/‖W‖", "max |ΔW|"]]
        rows += [[c.name, shape_text(c.shape), num(c.rel_diff), num(c.max_abs_diff)]
                 for c in cmp.changed]
    else:
        rows = [["changed tensors", "count", "min ‖ΔW‖/‖W‖", "max ‖ΔW‖/‖W‖"]]
        groups: dict[str, list[float]] = {}
        for c in cmp.changed:
            rel = c.rel_diff if c.rel_diff is not None else float("inf")
            groups.setdefault(LAYER.sub("*", c.name), []).append(rel)
        rows += [[k, f"×{len(v)}", num(min(v)), num(max(v))] for k, v in groups.items()]
    return "\n".join(lines + [""] + table(rows, right={2, 3}))
