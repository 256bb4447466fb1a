"""``loratool export``: base + adapters → a verified ONNX model.

The architecture comes from the base's ``config.json`` (transformers; no remote code), the
weights from the base with the adapters merged in memory by the merge code, the graph from
``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence axes. Verification always
runs (unless ``verify=False``): random token batches of two shapes other than the traced one,
one of them padded, through PyTorch and onnxruntime; above ``atol`` the export fails and its
output is removed. ``stream`` writes the merged weights tensor by tensor (export_stream),
``adapters_as_inputs`` leaves them unmerged as onnxruntime adapter files (export_adapters),
``with_past`` adds KV-cache graphs (export_cache).

Example::

    import loratool
    report = loratool.export("base/", ["adapter/"], "onnx/")
    print(report.opset, report.verification.max_abs_diff)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from ..engine.plan import Edit, plan_edits
from ..errors import FormatError, LoraToolError
from ..formats import read_any
from ..headers.checkpoint import Checkpoint
from ..io.shards import copy_config_files
from ..io.staging import Stage, check_output
from ..io.tensors import open_checkpoint
from ..model.adapter import LoraAdapter
from ..numerics.device import resolve_device
from ..options import Options, check_weights
from ..progress import SILENT, Bar, Progress
from ..reports.export import (
    AdapterInputsExportReport,
    LoraInputs,
    MergedExportReport,
    Streamed,
    StreamedInputs,
    Verification,
    WithPast,
)
from . import export_cache, export_stream, export_verify
from .export_adapters import lora_plan, write_adapters
from .export_check import check_config, load_config
from .export_model import (
    GraphSpec,
    Wrapper,
    batch,
    input_names,
    load_model,
    merge_in_memory,
    meta_model,
    vocab,
    wrapper,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ATOL = {"fp32": 1e-4, "fp16": 2e-2}
EXTRA = "pip install 'loratool[onnx]'"
SEED = 0  # the traced batch; verification draws from SEED + 1, the KV-cache graphs SEED + 2
PathLike = str | os.PathLike[str]
R = TypeVar("R", MergedExportReport, AdapterInputsExportReport)


def _need_extra() -> None:
    missing = []
    for mod in ("transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise LoraToolError(f"export needs {', '.join(missing)}: {EXTRA}")


def _task(config: PretrainedConfig, task: str) -> str:
    if task != "auto":
        return task
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    return "feature-extraction"


@dataclass
class Job:
    """One export, its inputs checked: what every step reads."""

    base: Checkpoint
    base_spec: str
    specs: list[str]  # the adapters, as given
    weights: list[float]
    out: Path
    inputs: list[Path]  # the local inputs, which the output may not touch
    config: PretrainedConfig
    task: str
    dtype: str
    opset: int | None
    atol: float
    verify: bool
    force: bool
    options: Options
    t0: float

    def graph(self, names: list[str]) -> GraphSpec:
        """What is traced: this architecture with these inputs and the task's output, on a
        random (2, 8) batch (seq ≥ 2: a sequence of 1 would bake a branch into the graph)."""
        example = batch(names, 2, 8, vocab(self.config), torch.Generator().manual_seed(SEED))
        output = "logits" if self.task == "causal-lm" else "last_hidden_state"
        return GraphSpec(self.config, self.task, self.dtype, self.opset, names, output,
                         example)


def export(base: PathLike, adapters: list[PathLike], out: PathLike, *,
           weights: list[float] | None = None, dtype: str = "fp32", opset: int | None = None,
           task: str = "auto", atol: float | None = None, verify: bool = True,
           force: bool = False, with_past: bool = False, stream: bool = False,
           adapters_as_inputs: bool = False, device: str = "auto",
           options: Options | None = None, progress: Progress = SILENT
           ) -> MergedExportReport | AdapterInputsExportReport:
    """Export ``base`` (a model folder or Hub id with a ``config.json``) with ``adapters``
    merged to ``out/model.onnx`` and verify it in onnxruntime against PyTorch.

    ``dtype``: fp32 or fp16. ``task``: auto (from the config's architectures), causal-lm
    (logits) or feature-extraction (the last hidden state). ``atol``: the largest accepted
    |ONNX − PyTorch| (default 1e-4 for fp32, 2e-2 for fp16). ``stream``: trace without
    weights and write the merged weights tensor by tensor (any size). ``adapters_as_inputs``:
    the base graph with LoRA inputs and one onnxruntime adapter file per adapter
    (an :class:`AdapterInputsExportReport`). ``with_past``: also prefill.onnx and decode.onnx
    over a KV cache. Needs the extra ``loratool[onnx]``; raises
    :class:`loratool.LoraToolError` (nothing is written) on bad input or a failed check.

    Example::

        r = loratool.export("base/", ["adapter/"], "onnx/", dtype="fp16")
        r.files, r.verification.max_abs_diff
    """
    _need_extra()

    t0 = time.perf_counter()
    if dtype not in ATOL:
        raise LoraToolError("--dtype must be fp32 or fp16 (bf16 does not run on "
                            "onnxruntime's CPU provider)")
    if task not in ("auto", "causal-lm", "feature-extraction"):
        raise LoraToolError(f"unknown --task {task}; use auto, causal-lm or feature-extraction")

    base_spec, specs, out = os.fspath(base), [os.fspath(a) for a in adapters], Path(out)
    weights = check_weights(weights, len(specs))
    atol = ATOL[dtype] if atol is None else atol
    if not (atol >= 0 and atol < float("inf")):
        raise LoraToolError(f"--atol must be a finite number ≥ 0, got {atol}")
    ckpt = open_checkpoint(base_spec, progress)
    if ckpt.config is None:
        raise FormatError(f"{base_spec}: no config.json beside the weights; export needs the "
                          "architecture")
    inputs = [p for p in [Path(base_spec), *map(Path, specs)] if p.exists()]
    check_output(out, inputs, force)
    for name in ckpt.tensors:  # a Hub base: make every weight file local first
        ckpt.local_info(name)

    config = load_config(ckpt, base_spec)
    task = _task(config, task)

    # the config is a claim: checked against the weights before any model is built
    check_config(ckpt, config, task, dtype, stream or adapters_as_inputs)
    if with_past and task != "causal-lm":
        raise LoraToolError("--with-past is for causal LMs (it exports a KV-cache decoder)")
    if with_past and (stream or adapters_as_inputs):
        raise LoraToolError("--with-past builds the merged model in memory; export it without "
                            "--stream and --adapters-as-inputs")

    dev = resolve_device("cpu" if with_past and device == "auto" else device)
    if with_past and dev.type != "cpu":
        raise LoraToolError("--with-past is verified on the CPU; use --device cpu")
    job = Job(ckpt, base_spec, specs, weights, out, inputs, config, task, dtype, opset, atol,
              verify, force, options or Options(), t0)
    if adapters_as_inputs:
        if not specs:
            raise LoraToolError("--adapters-as-inputs: name the adapters to write as "
                                "onnxruntime adapter files")
        with progress.bar("export", total=3, unit="step") as bar, \
                export_verify.on_device(dev):
            return _swappable(job, bar)
    with progress.bar("export", total=4 if with_past else 3, unit="step") as bar, \
            export_verify.on_device(dev):
        return _merged(job, with_past, stream, bar)


def _check_opset(path: Path, opset: int | None) -> int | None:
    """The graph's opset; a requested one the exporter did not write is an error (its version
    converter falls back to 18 silently, which can leave operators of a newer opset)."""
    import onnx

    got = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:
        raise LoraToolError(f"--opset {opset}: the exporter wrote opset {got} instead (it "
                            f"converts to opsets from 14 to {onnx.defs.onnx_opset_version()}, "
                            "as far as the model's operators allow); choose one of those, or "
                            "leave --opset out")
    return got


def _trace(module: Wrapper, graph: GraphSpec, path: Path) -> None:
    """torch.onnx.export (dynamo) with dynamic batch and sequence axes."""

    names = graph.names
    dyn = tuple({0: "batch", 1: "sequence"} for _ in names)
    try:
        with export_cache.quiet_exporter(), torch.no_grad():
            torch.onnx.export(module, tuple(graph.example[n] for n in names), str(path),
                              dynamo=True, dynamic_shapes=dyn, input_names=names,
                              output_names=[graph.output], opset_version=graph.opset,
                              external_data=True)
    except Exception as e:  # the exporter's errors are long; keep the first line
        raise export_cache.export_failed("torch.onnx.export", graph.config.model_type, e) from e


def _architecture(config: PretrainedConfig) -> str | None:
    return (config.architectures or [None])[0]


def _swappable(job: Job, bar: Bar) -> AdapterInputsExportReport:
    """The base graph with LoRA inputs (streamed: any size) and one onnxruntime adapter file
    per adapter, checked by switching adapters in one session (export_adapters)."""

    bar.describe("export: reading the adapters")
    adapters = [read_any(s, job.base_spec) for s in job.specs]
    plan = lora_plan(adapters, job.specs, job.base)
    names = input_names(meta_model(job.config, job.task, job.dtype).model, job.config)
    graph = job.graph(names)
    bar.update(1)
    bar.describe("export: writing the graph with LoRA inputs and the adapter files")
    with Stage(job.out, job.inputs, job.force, options=job.options) as stage:
        tmp = stage.tmp
        assert tmp is not None
        info = export_stream.write_streamed(job.base, graph, {}, tmp,
                                            lora=(plan.modules, plan.rank),
                                            options=job.options)
        written = write_adapters(tmp, plan, job.weights, job.specs, job.dtype,
                                 info.lora_inputs)
        graph_opset = _check_opset(tmp / "model.onnx", job.opset)
        bar.update(1)
        bar.describe("export: switching adapters in onnxruntime")
        result = Verification(checked=False)
        if job.verify:
            feeds = export_verify.batches(names, vocab(job.config), SEED + 1)
            result = export_verify.check_swappable(
                tmp, info, job.base, graph, adapters, job.weights, job.specs, plan,
                written.files, feeds, job.atol, options=job.options)
        bar.update(1)
        not_copied = copy_config_files(job.base.folder, tmp)
        report = AdapterInputsExportReport(
            base=job.base_spec, adapters=job.specs, weights=job.weights, task=job.task,
            architecture=_architecture(job.config), inputs=names, outputs=[graph.output],
            dynamic_axes={"batch": 0, "sequence": 1}, dtype=job.dtype, opset=graph_opset,
            adapter_files=written.files,
            lora=LoraInputs(modules=len(plan.modules) - len(written.unused), rank=plan.rank,
                            outside_the_graph=written.unused),
            verification=result,
            streamed=StreamedInputs(initializers=info.initializers, changed=info.changed,
                                    bytes=info.bytes, lora_inputs=len(info.lora_inputs)),
            tensors_changed_by_adapters=0, with_past=None, not_copied=not_copied, files=[],
            output=str(job.out), seconds=0.0)
        return _publish(stage, report, job.t0)


@dataclass
class _Prepared:
    """The model merged in memory and its wrapper, or (``stream``) only the edits."""

    model: torch.nn.Module | None
    module: Wrapper | None
    edits: dict[str, Edit]
    changed: int  # tensors the adapters change
    names: list[str]  # the graph's inputs


def _prepare(job: Job, adapters: list[LoraAdapter], stream: bool) -> _Prepared:
    if stream:
        edits = plan_edits(job.base, adapters, job.weights, job.specs)[0] if adapters else {}
        names = input_names(meta_model(job.config, job.task, job.dtype).model, job.config)
        return _Prepared(None, None, edits, len(edits), names)
    model = load_model(job.base.folder, job.task, job.config)
    changed = merge_in_memory(model, job.base, adapters, job.weights, job.specs)
    if job.dtype == "fp16":
        model = model.half()
    return _Prepared(model, wrapper(model, job.task), {}, changed,
                     input_names(model, job.config))


def _merged(job: Job, with_past: bool, stream: bool, bar: Bar) -> MergedExportReport:
    """load → merge in memory → trace → verify → (KV-cache graphs) → publish; with ``stream``
    trace the meta model and write the merged weights tensor by tensor (export_stream)."""

    bar.describe("export: reading the adapters" if stream else
                 "export: loading the model and merging the adapters")
    adapters = [read_any(s, job.base_spec) for s in job.specs]
    prep = _prepare(job, adapters, stream)
    bar.update(1)
    bar.describe("export: writing the graph, tensor by tensor" if stream else
                 "export: tracing the ONNX graph")
    v = vocab(job.config)
    graph = job.graph(prep.names)
    with Stage(job.out, job.inputs, job.force, options=job.options) as stage:
        tmp = stage.tmp
        assert tmp is not None
        streamed: Streamed | None = None
        if prep.module is None:
            streamed = export_stream.write_streamed(job.base, graph, prep.edits, tmp,
                                                    options=job.options)
        else:
            _trace(prep.module, graph, tmp / "model.onnx")
        graph_opset = _check_opset(tmp / "model.onnx", job.opset)
        bar.update(1)
        if job.verify:
            bar.describe("export: checking the graph in onnxruntime")
        result = _verify_merged(job, adapters, prep, graph, streamed, tmp) if job.verify \
            else Verification(checked=False)
        bar.update(1)
        cached: WithPast | None = None
        if with_past:
            assert prep.model is not None  # with_past is refused with stream
            bar.describe("export: the prefill and decode graphs (KV cache)")
            cached = export_cache.with_past(prep.model, job.config, tmp, v.size, job.opset,
                                            SEED + 2, job.verify, job.atol)
            bar.update(1)
        not_copied = copy_config_files(job.base.folder, tmp)
        report = MergedExportReport(
            base=job.base_spec, adapters=job.specs, weights=job.weights, task=job.task,
            architecture=_architecture(job.config), inputs=prep.names,
            outputs=[graph.output], dynamic_axes={"batch": 0, "sequence": 1},
            dtype=job.dtype, opset=graph_opset,
            tensors_changed_by_adapters=prep.changed, verification=result, with_past=cached,
            not_copied=not_copied, streamed=streamed,
            files=sorted(p.name for p in tmp.iterdir()), output=str(job.out), seconds=0.0)
        return _publish(stage, report, job.t0)


def _verify_merged(job: Job, adapters: list[LoraAdapter], prep: _Prepared, graph: GraphSpec,
                   streamed: Streamed | None, tmp: Path) -> Verification:
    """The merged graph against PyTorch: the model merged in memory, or for a streamed graph
    the one transformers loads with the adapters merged (what the in-memory export checks)."""
    v = vocab(job.config)

    def check(module: Wrapper, path: Path) -> Verification:
        return export_verify.verify_graph(module, path, graph.names, v, SEED + 1, job.atol)

    if prep.module is None:
        assert streamed is not None

        def merged(cfg: PretrainedConfig) -> Wrapper:
            m = load_model(job.base.folder, job.task, cfg)
            merge_in_memory(m, job.base, adapters, job.weights, job.specs, partial=True)
            return wrapper(m.half() if job.dtype == "fp16" else m, job.task)

        return export_verify.verify_streamed(tmp, streamed, job.base, graph, prep.edits,
                                             merged, check, options=job.options)
    result = check(prep.module, tmp / "model.onnx")
    prep.module.cpu()  # verification may have moved it to the GPU
    return result


def _publish(stage: Stage, report: R, t0: float) -> R:
    """export.json beside the graph, then the folder into place; the report completed."""
    assert stage.tmp is not None
    (stage.tmp / "export.json").write_text(report.saved())
    report.files = sorted(p.name for p in stage.tmp.iterdir())
    stage.publish()
    report.seconds = time.perf_counter() - t0
    return report
