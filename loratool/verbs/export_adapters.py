"""``export --adapters-as-inputs``: the base graph with LoRA factors as inputs, and each adapter
as an onnxruntime adapter file, so that one loaded ``InferenceSession`` switches adapters per
run (``RunOptions.add_active_adapter``) without a reload: the LoRA paper's cheap task switch.

The graph has PEFT's LoRA branch on every module any adapter targets, at the largest rank r
among them and scale 1; its factors are initializers that are also graph inputs, zero by
default, so a run without an adapter is the base. Each adapter is written with its factors
zero-padded to rank r and its scale (times ``--weight``) folded into lora_B; modules it does
not target keep the zero defaults.

Example::
    mods, rank, per = lora_plan(adapters, specs, base)
    files = write_adapters(folder, per, weights, specs, rank, "fp32", info["lora_inputs"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FormatError, LoraToolError
from ..formats import require_lora
from ..model.adapter import match_base
from ..verbs.export_stream import providers

SUFFIX = ".onnx_adapter"


def lora_plan(adapters: list[Any], specs: list[str], base: Any
              ) -> tuple[list[str], int, list[dict[str, Any]]]:
    """The modules the graph needs LoRA inputs on, its rank, and each adapter's modules by
    name; what an onnxruntime adapter cannot express is refused by name."""

    per: list[dict[str, Any]] = []
    for ad, spec in zip(adapters, specs):
        require_lora(ad, spec, "an onnxruntime adapter holds LoRA factors only")
        if ad.full:
            raise FormatError(f"{spec}: full tensors ({next(iter(ad.full))} …) replace base "
                              "weights; an onnxruntime adapter can only add LoRA factors: "
                              "export it merged instead (without --adapters-as-inputs)")
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
    return modules, rank, per


def adapter_name(spec: str, taken: set[str]) -> str:
    """A file stem for an adapter: its folder or file name, made unique."""
    stem = Path(spec.rstrip("/")).name.split("@")[0].removesuffix(".safetensors") or "adapter"
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}-{k}", k + 1
    taken.add(name)
    return name


def write_adapters(folder: Path, per: list[dict[str, Any]], weights: list[float],
                   specs: list[str], rank: int, dtype: str, inputs: list[str]
                   ) -> tuple[list[str], list[str]]:
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
    for mods, w, spec in zip(per, weights, specs):
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
    return files, sorted(unused)


def check(folder: Path, model: str, files: list[str], references: Any, batches: Any,
          atol: float) -> dict[str, Any]:
    """In one session: no adapter against the base, then each adapter against the base with
    that adapter merged (``references(i)``; ``None`` the base)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # LoRA inputs are initializers by design: no warnings about it

    sess = ort.InferenceSession(str(folder / model), opts, providers=providers())
    results = []
    for i in [None, *range(len(files))]:
        run = ort.RunOptions()
        if i is not None:
            lora = ort.LoraAdapter()
            lora.Load(str(folder / files[i]))
            run.add_active_adapter(lora)
        ref = references(i)
        worst = 0.0
        for feed in batches:
            want = ref(feed)
            got = sess.run(None, {k: v.numpy() for k, v in feed.items()}, run)[0]
            keep = feed["attention_mask"].numpy().astype(bool)
            worst = max(worst, float(np.abs(got.astype(np.float32) - want)[keep].max()))
        results.append({"adapter": None if i is None else files[i], "max_abs_diff": worst})
        if not worst <= atol:
            which = "the base (no adapter active)" if i is None else files[i]
            raise LoraToolError(f"verification failed: with {which}, ONNX and PyTorch differ "
                                f"by {worst:.3g} > --atol {atol:g}; nothing was written")
    return {"checked": True, "ok": True, "atol": atol, "switches": results,
            "max_abs_diff": max(r["max_abs_diff"] for r in results)}
