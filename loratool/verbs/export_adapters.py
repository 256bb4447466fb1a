"""``export --adapters-as-inputs``: the base graph with LoRA factors as inputs, and each adapter
as an onnxruntime adapter file, so that one loaded ``InferenceSession`` switches adapters per
run (``RunOptions.add_active_adapter``) without a reload: the LoRA paper's cheap task switch.

The graph has PEFT's LoRA branch on every module any adapter targets, at the largest rank r
among them and scale 1; its factors are initializers that are also graph inputs, zero by
default, so a run without an adapter is the base. Each adapter is written with its factors
zero-padded to rank r and its scale (times ``--weight``) folded into lora_B; modules it does
not target keep the zero defaults. The session that switches them is checked in
export_verify.

Example::
    plan = lora_plan(adapters, specs, base)
    written = write_adapters(folder, plan, weights, specs, "fp32", streamed.lora_inputs)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FormatError
from ..formats import require_lora
from ..headers.checkpoint import Checkpoint
from ..model.adapter import LoraAdapter, LoraModule, match_base
from . import prechecks

SUFFIX = ".onnx_adapter"


@dataclass
class LoraPlan:
    """The LoRA branch the graph gets: on which modules, at which rank, and each adapter's
    modules by name."""

    modules: list[str]
    rank: int  # the largest among the adapters
    per: list[dict[str, LoraModule]]  # one per adapter, in order


@dataclass
class AdapterFiles:
    """What :func:`write_adapters` wrote: the files in order (relative to the folder) and
    the modules left out because the graph has no LoRA inputs for them."""

    files: list[str]
    unused: list[str]


def lora_plan(adapters: list[LoraAdapter], specs: list[str], base: Checkpoint) -> LoraPlan:
    """The modules the graph needs LoRA inputs on, its rank, and each adapter's modules by
    name; what an onnxruntime adapter cannot express is refused by name."""

    per: list[dict[str, LoraModule]] = []
    for ad, spec in zip(adapters, specs):
        require_lora(ad, spec, "an onnxruntime adapter holds LoRA factors only")
        if ad.full:
            raise prechecks.export_inputs_full(spec, next(iter(ad.full)))
        if len(ad.components) > 1 or ad.components[0] is not None:
            for m in ad.modules.values():
                m.component = None
        match_base(ad, base)  # names and shapes fit; GPT-2's Conv1D turns fan_in_fan_out
        for m in ad.modules.values():
            what = ("DoRA" if m.magnitude is not None else "a lora bias" if m.bias is not None
                    else None if m.layout in ("linear", "fan_in_fan_out") else m.layout)
            if what:
                raise FormatError(f"{spec}: {m.name} has {what}, which the graph's LoRA "
                                  "inputs (x·Aᵀ·Bᵀ added to a linear layer) cannot express; "
                                  "export it merged instead")
        per.append({m.name: m for m in ad.modules.values()})
    modules = sorted({n for p in per for n in p})
    rank = max((m.rank for p in per for m in p.values()), default=1)
    return LoraPlan(modules, rank, per)


def adapter_name(spec: str, taken: set[str]) -> str:
    """A file stem for an adapter: its folder or file name, made unique."""
    stem = Path(spec.rstrip("/")).name.split("@")[0].removesuffix(".safetensors") or "adapter"
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}-{k}", k + 1
    taken.add(name)
    return name


def write_adapters(folder: Path, plan: LoraPlan, weights: list[float], specs: list[str],
                   dtype: str, inputs: list[str]) -> AdapterFiles:
    """One ``adapters/NAME.onnx_adapter`` per adapter: the file names, in order, and the
    modules left out because the graph has no LoRA inputs for them: the exporter drops what
    the output does not depend on (BERT's pooler under last_hidden_state; the layers a
    truncated verification copy lacks), so their change cannot reach the output."""
    import onnxruntime as ort

    want = torch.float16 if dtype == "fp16" else torch.float32
    (folder / "adapters").mkdir()
    taken: set[str] = set()
    files: list[str] = []
    unused: set[str] = set()
    graph = set(inputs)
    rank = plan.rank
    for mods, w, spec in zip(plan.per, weights, specs):
        params = {}
        for name, m in mods.items():
            a_name = f"model.{name}.lora_A.default.weight"
            b_name = f"model.{name}.lora_B.default.weight"
            if a_name not in graph or b_name not in graph:
                unused.add(name)
                continue
            A = torch.zeros(rank, m.A.shape[1], dtype=torch.float32)
            B = torch.zeros(m.B.shape[0], rank, dtype=torch.float32)
            A[: m.rank] = m.A.float()
            B[:, : m.rank] = m.B.float() * (m.scale * w)  # the graph's scale is 1
            for key, t in ((a_name, A), (b_name, B)):
                params[key] = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(t.to(want).numpy()))
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        path = folder / "adapters" / (adapter_name(spec, taken) + SUFFIX)
        fmt.export_adapter(str(path))
        files.append(f"adapters/{path.name}")
    return AdapterFiles(files, sorted(unused))
