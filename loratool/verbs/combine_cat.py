"""``combine --method cat`` as what it is, concatenation, without torch.

When every adapter is a local PEFT folder of plain LoRA modules (linear layers, one dtype) and
each module's parts share one wᵢ·sᵢ (one alpha/r, weights 1: the usual case), the exact sum is
the factors as they are, B side by side and A stacked, with that scale: the bytes are copied,
nothing is computed or rounded. The files written are the ones the general path writes
(``combine_methods._cat``, which makes the same choice), in the time it takes to read and
write them. Anything else (another format, DoRA, biases, scales that differ, a module whose
every part has a factor of zeros, which the general path leaves out at rank 0) returns None and
takes the general path.

Example::
    report = cat_bytes(["a/", "b/"], Path("both"), [1.0, 1.0], fmt=None, dtype="keep",
                       base=None, seed=0, force=False)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LoraToolError
from ..headers.adapters import PEFT_PREFIX, check_one_format, describe_peft, detect, split_key
from ..headers.checkpoint import Checkpoint, open_checkpoint
from ..headers.peft_config import AdapterMeta, model_card, peft_config, written_config
from ..headers.safetensors import TensorInfo, dtype_bytes, read_tensor_bytes
from ..io.shards import ShardWriter
from ..io.staging import check_output
from ..options import DTYPES, Options
from ..progress import SILENT, Progress
from ..reports.combine import CombineModule, CombineReport, CombineTotals

NOTE = "Combined by loratool (method cat)."


def kept_scale(parts: list[tuple[float, int, float]]) -> float | None:
    """The one scale cat writes factors as they are with: every part's (scale, rank, weight)
    has the same w·s, c, and c·Σr is a whole number up to 256 (an alpha every format stores
    exactly, a bf16 kohya alpha too) that gives c back. None otherwise."""
    cs = {s * w for s, _, w in parts}
    if len(cs) != 1:
        return None
    c = cs.pop()
    k = sum(r for _, r, _ in parts)
    alpha = c * k
    return c if c > 0 and alpha.is_integer() and alpha <= 256 and alpha / k == c else None


@dataclass
class _Factors:
    """One input module: its rank, scale and weight, and where its A [r, in] and B [out, r]
    are."""

    rank: int
    scale: float
    weight: float
    A: TensorInfo
    B: TensorInfo


@dataclass
class _Module:
    """One written module (what ``headers.peft_config`` needs of it) and its parts."""

    name: str
    layout: str
    parts: list[_Factors] = field(default_factory=list)
    scale: float = 0.0
    rslora: bool = False
    is_experts: bool = False
    has_dora: bool = False
    has_bias: bool = False

    @property
    def rank(self) -> int:
        return sum(p.rank for p in self.parts)

    @property
    def alpha(self) -> float:
        return self.scale * self.rank


@dataclass
class _Adapter:
    ckpt: Checkpoint
    meta: AdapterMeta
    factors: dict[str, tuple[str, _Factors]]  # module → (layout, factors), in natural order


def cat_bytes(specs: list[str], out: Path, weights: list[float], *, fmt: str | None,
              dtype: str, base: str | None, seed: int, force: bool,
              options: Options | None = None, progress: Progress = SILENT
              ) -> CombineReport | None:
    """The cat of ``specs`` written byte for byte to ``out``, or None when the general path
    must do it (see the module's docstring)."""
    t0 = time.perf_counter()
    if fmt not in (None, "peft") or base is not None:
        return None
    read = [_read(spec, w) for spec, w in zip(specs, weights)]
    if any(r is None for r in read):
        return None
    adapters = [r for r in read if r is not None]
    modules = _modules(adapters)
    if modules is None:
        return None
    codes = {p.A.dtype for m in modules for p in m.parts} | {
        p.B.dtype for m in modules for p in m.parts}
    if len(codes) != 1 or (DTYPES[dtype] or next(iter(codes))) not in codes:
        return None  # a dtype to convert to: the general path rounds it
    code = codes.pop()
    inputs = [Path(s) for s in specs]
    check_output(out, inputs, force)
    first = adapters[0].meta
    meta = AdapterMeta(first.task_type, first.base_model, first.base_revision,
                       any(a.meta.tie_embeddings for a in adapters))
    cfg, order = peft_config(modules, meta, [])
    cfg = written_config(cfg)
    params = sum(m.rank * (m.parts[0].A.shape[1] + m.parts[0].B.shape[0]) for m in modules)
    plan = [(f"{PEFT_PREFIX}{m.name}.lora_{ab}.weight", code, shape) for m in order
            for ab, shape in (("A", (m.rank, m.parts[0].A.shape[1])),
                              ("B", (m.parts[0].B.shape[0], m.rank)))]
    try:  # laid out up front: the header first, then each byte written once
        with ShardWriter(out, inputs=inputs, force=force, filename="adapter_model.safetensors",
                         max_shard_size=1 << 62, plan=plan, options=options) as w, \
                progress.bar("combine", total=len(order), unit="module") as bar:
            for m in order:
                bar.update(1)
                a, b = _stacked(m)
                w.add_bytes(f"{PEFT_PREFIX}{m.name}.lora_A.weight", code, a.shape, a.data)
                w.add_bytes(f"{PEFT_PREFIX}{m.name}.lora_B.weight", code, b.shape, b.data)
            w.add_file("adapter_config.json", json.dumps(cfg, indent=2) + "\n")
            w.add_file("README.md", model_card(meta, cfg, NOTE, modules=len(modules),
                                               ranks=sorted({m.rank for m in modules}),
                                               full=0, params=params))
    except _Zero:  # nothing was published: the stage is gone
        return None
    entries = [CombineModule(m.name, len(m.parts), [p.rank for p in m.parts], rank=m.rank,
                             rel_error=0.0) for m in modules]
    totals = CombineTotals(lora_modules=len(modules), parameters=params,
                           bytes=params * dtype_bytes(code), max_rel_error=0.0,
                           input_ranks=sorted({p.rank for m in modules for p in m.parts}),
                           ranks=sorted({m.rank for m in modules}))
    return CombineReport(operation="combine", inputs=specs, weights=weights, method="cat",
                         output=str(out), format="peft", policy=None, density=None, seed=seed,
                         modules=entries, notes=[], totals=totals,
                         seconds=time.perf_counter() - t0)


def _read(spec: str, weight: float) -> _Adapter | None:
    """A local PEFT folder of plain LoRA modules, from its headers; None for anything else."""
    folder = Path(spec)
    if not (folder.is_dir() and (folder / "adapter_model.safetensors").is_file()):
        return None
    try:
        check_one_format(folder)
        ckpt = open_checkpoint(folder)
        cfg = ckpt.adapter_config
        if cfg is None or cfg.get("peft_type", "LORA") != "LORA" or detect(ckpt) != (
                "adapter", "peft"):
            return None
        facts, entries = describe_peft(ckpt.tensors, cfg, str(folder))
    except LoraToolError:
        return None  # the general path says what is wrong, in full
    if facts.full_tensors or facts.target_parameters:
        return None
    keys: dict[str, dict[str, TensorInfo]] = {}
    for name, info in ckpt.tensors.items():
        rel = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        sk = split_key(rel)
        if sk is None or sk[1] not in ("lora_A", "lora_B") or sk[2] != "weight":
            return None
        keys.setdefault(sk[0], {})[sk[1]] = info
    factors: dict[str, tuple[str, _Factors]] = {}
    for e in entries:
        ab = keys.get(e.name, {})
        A, B = ab.get("lora_A"), ab.get("lora_B")
        if (A is None or B is None or e.dora or e.bias or e.experts
                or e.layout not in ("linear", "fan_in_fan_out") or len(A.shape) != 2
                or len(B.shape) != 2 or A.shape[0] != e.rank or B.shape[1] != e.rank):
            return None
        factors[e.name] = (e.layout, _Factors(e.rank, e.scale, weight, A, B))
    meta = AdapterMeta(facts.task_type, facts.base_model, facts.base_model_revision,
                       cfg.get("ensure_weight_tying") is True)
    return _Adapter(ckpt, meta, factors)


def _modules(adapters: list[_Adapter]) -> list[_Module] | None:
    """The written modules in the general path's order (the first adapter's, then each new
    one's), each with one scale; None when a module's parts disagree (shapes: the general
    path names the mismatch; scales: it scales A)."""
    out: dict[str, _Module] = {}
    for ad in adapters:
        for name, (layout, f) in ad.factors.items():
            m = out.setdefault(name, _Module(name, layout))
            if m.layout != layout or any(p.A.shape[1] != f.A.shape[1] or
                                         p.B.shape[0] != f.B.shape[0] for p in m.parts):
                return None
            m.parts.append(f)
    for m in out.values():
        c = kept_scale([(p.scale, p.rank, p.weight) for p in m.parts])
        if c is None:
            return None
        m.scale = c
    return list(out.values())


class _Zero(Exception):
    """A module whose B@A is zero: the general path leaves it out at rank 0. (Parts that
    cancel each other exactly are not looked for: their module is written, its ΔW zero.)"""


def _values(info: TensorInfo) -> tuple[np.ndarray, bool]:
    """A factor's values as little-endian unsigned integers of their width, [rows, columns]
    (only bytes are moved: no float is read), and whether every one is ±0."""
    kind = np.dtype(f"<u{dtype_bytes(info.dtype)}")
    v = np.frombuffer(read_tensor_bytes(info), dtype=kind).reshape(info.shape)
    magnitude = np.iinfo(kind).max >> 1  # every bit but the sign
    return v, not np.bitwise_and(v, magnitude).any()


def _stacked(m: _Module) -> tuple[np.ndarray, np.ndarray]:
    """A: the parts' rows one after another; B: each row the parts' rows side by side.
    :class:`_Zero` when every part has a factor of zeros (B@A is zero: rank 0, left out)."""
    As = [_values(p.A) for p in m.parts]
    Bs = [_values(p.B) for p in m.parts]
    if all(za or zb for (_, za), (_, zb) in zip(As, Bs)):
        raise _Zero
    return (np.concatenate([a for a, _ in As], axis=0),
            np.concatenate([b for b, _ in Bs], axis=1))
