"""``loratool export``: base + adapters → a verified ONNX model.

The architecture comes from the base's ``config.json`` (transformers; no remote code), the
weights from the base with the adapters merged in memory by the merge code, the graph from
``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence axes. Verification always
runs (unless ``verify=False``): random token batches of two shapes other than the traced one,
one of them padded, through PyTorch and onnxruntime; above ``atol`` the export fails and its
output is removed.

Example::
    report = export("base/", ["adapter/"], Path("onnx-out"))
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import kernel
from ..engine.plan import plan_edits
from ..errors import FormatError, LoraToolError
from ..formats import read_any
from ..io.staging import Stage, check_output
from ..io.tensors import open_checkpoint
from ..io.writer import copy_config_files
from ..numerics.device import resolve_device
from ..options import check_weights
from ..progress import SILENT, Progress
from ..verbs import export_adapters as xa
from ..verbs import export_cache, export_stream
from ..verbs.export_cache import quiet_exporter
from ..verbs.export_check import check_config, load_config

ATOL = {"fp32": 1e-4, "fp16": 2e-2}
EXTRA = "pip install 'loratool[onnx]'"


def _need_extra() -> None:
    missing = []
    for mod in ("transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise LoraToolError(f"export needs {', '.join(missing)}: {EXTRA}")


def _task(config: Any, task: str) -> str:
    if task != "auto":
        return task
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    return "feature-extraction"


def _load_model(folder: Path, task: str, config: Any) -> Any:
    import transformers

    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()
    try:
        with quiet_exporter():
            model, info = cls.from_pretrained(folder, config=config, dtype=torch.float32,
                                              trust_remote_code=False,
                                              output_loading_info=True)
    except ValueError as e:
        raise FormatError(f"{folder}: transformers cannot build {config.model_type!r} for "
                          f"task {task} ({str(e).splitlines()[0]})") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values: never export those
        raise FormatError(f"{folder}: the checkpoint lacks {len(missing)} weights the "
                          f"architecture needs (first: {missing[0]}); is it complete?")
    return model.eval()


def input_names(model: Any, config: Any) -> list[str]:
    """The inputs a tokenizer gives this model: ids and mask, and token_type_ids where the
    model has token types (BERT and its kin; GPT-2 takes the argument but has no types)."""

    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters and int(
            getattr(config, "type_vocab_size", 0) or 0) > 0:
        names.append("token_type_ids")
    return names


def _merge_in_memory(model: Any, base: Any, adapters: list[Any], weights: list[float],
                     specs: list[str], partial: bool = False) -> int:
    """Apply the adapters to the model's parameters with the merge code's math (``partial``:
    a model of the first layers only, which lacks the later layers' parameters)."""

    if not adapters:
        return 0
    edits, _ = plan_edits(base, adapters, weights, specs)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))

    def find(name: str) -> Any:
        if name in params:
            return params[name]
        hits = [p for n, p in params.items() if n.endswith("." + name) or name.endswith(
            "." + n)]
        if len(hits) == 1:
            return hits[0]
        raise FormatError(f"cannot find {name} among the model's parameters")

    with torch.no_grad():
        for name, e in edits.items():
            if partial and not any(n == name or n.endswith("." + name) or name.endswith(
                    "." + n) for n in params):
                continue
            p = find(name)
            W = p.data.to(torch.float32, copy=True)
            new = kernel.merged(W, e, 1.0, torch.device("cpu"), name=name)
            if new.shape != p.shape:
                raise FormatError(f"{name}: a resized full tensor cannot be exported in place")
            p.data.copy_(new.to(p.dtype))
    return len(edits)


def _batch(names: list[str], batch: int, seq: int, vocab: int, types: int, pad_id: int,
           g: Any, padded: bool = False) -> dict[str, Any]:
    """Random inputs by name; ``padded`` right-pads rows 1 and 2 as a tokenizer would."""

    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 11:] = 0
        mask[2, 6:] = 0
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:  # a second segment in the later half of each row
        out["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq) \
            .clone() % max(types, 1)
    return out


def _trace(wrapper: Any, example: dict[str, Any], names: list[str], output: str, path: Path,
           opset: int | None, config: Any) -> None:
    """torch.onnx.export (dynamo) with dynamic batch and sequence axes."""

    dyn = tuple({0: "batch", 1: "sequence"} for _ in names)
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, tuple(example[n] for n in names), str(path),
                              dynamo=True, dynamic_shapes=dyn, input_names=names,
                              output_names=[output], opset_version=opset, external_data=True)
    except Exception as e:  # the exporter's errors are long; keep the first line
        raise LoraToolError(f"torch.onnx.export failed for {config.model_type}: "
                            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from e


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


def _verify(wrapper: Any, path: Path, names: list[str], vocab: int, types: int, pad: int,
            seed: int, atol: float) -> dict[str, Any]:
    """Two shapes unlike the traced (2, 8) one, the second right-padded, through PyTorch and
    onnxruntime; padded positions are not compared."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=export_stream.providers())
    except Exception as e:  # onnxruntime's own errors share no base class
        raise LoraToolError(f"verification failed: onnxruntime cannot load the exported graph "
                            f"({str(e).splitlines()[0][:200]}); nothing was written") from e
    g = torch.Generator().manual_seed(seed)
    worst, shapes = 0.0, []
    forward = export_stream.reference_run(wrapper)
    for batch, seq in ((1, 5), (3, 17)):
        b = _batch(names, batch, seq, vocab, types, pad, g, padded=batch > 1)
        ref = forward(b)
        got = sess.run(None, {k: v.numpy() for k, v in b.items()})[0].astype(np.float32)
        keep = b["attention_mask"].numpy().astype(bool)
        if not (np.isfinite(ref[keep]).all() and np.isfinite(got[keep]).all()):
            raise LoraToolError("verification failed: the outputs hold NaN or Inf (in "
                                "PyTorch or ONNX; fp16 overflow?); nothing was written")
        worst = max(worst, float(np.abs(got - ref)[keep].max()))
        shapes.append([batch, seq])
    if not worst <= atol:
        raise LoraToolError(f"verification failed: ONNX and PyTorch outputs differ by "
                            f"{worst:.3g} > --atol {atol:g}; nothing was written")
    return {"checked": True, "shapes": shapes, "max_abs_diff": worst, "atol": atol, "ok": True}


def export(base_spec: str, adapter_specs: list[str], out: Path, *,
           weights: list[float] | None = None, dtype: str = "fp32", opset: int | None = None,
           task: str = "auto", atol: float | None = None, verify: bool = True,
           force: bool = False, seed: int = 0, with_past: bool = False,
           stream: bool = False, adapters_as_inputs: bool = False, device: str = "auto",
           progress: Progress = SILENT) -> dict[str, Any]:
    """Export base + adapters to ``out/model.onnx`` and verify it; returns the report."""
    _need_extra()

    t0 = time.perf_counter()
    if dtype not in ATOL:
        raise LoraToolError("--dtype must be fp32 or fp16 (bf16 does not run on "
                            "onnxruntime's CPU provider)")
    if task not in ("auto", "causal-lm", "feature-extraction"):
        raise LoraToolError(f"unknown --task {task}; use auto, causal-lm or feature-extraction")

    weights = check_weights(weights, len(adapter_specs))
    atol = ATOL[dtype] if atol is None else atol
    if not (atol >= 0 and atol < float("inf")):
        raise LoraToolError(f"--atol must be a finite number ≥ 0, got {atol}")
    base = open_checkpoint(base_spec, progress)
    if base.config is None:
        raise FormatError(f"{base_spec}: no config.json beside the weights; export needs the "
                          "architecture")
    inputs = [p for p in [Path(base_spec), *map(Path, adapter_specs)] if p.exists()]
    check_output(out, inputs, force)
    for name in base.tensors:  # a Hub base: make every weight file local first
        base.local_info(name)

    config = load_config(base, base_spec)
    task = _task(config, task)

    # the config is a claim: checked against the weights before any model is built
    check_config(base, config, task, dtype, stream or adapters_as_inputs)
    if with_past and task != "causal-lm":
        raise LoraToolError("--with-past is for causal LMs (it exports a KV-cache decoder)")
    if with_past and (stream or adapters_as_inputs):
        raise LoraToolError("--with-past builds the merged model in memory; export it without "
                            "--stream and --adapters-as-inputs")

    dev = resolve_device("cpu" if with_past and device == "auto" else device)
    if with_past and dev.type != "cpu":
        raise LoraToolError("--with-past is verified on the CPU; use --device cpu")
    if adapters_as_inputs:
        if not adapter_specs:
            raise LoraToolError("--adapters-as-inputs: name the adapters to write as "
                                "onnxruntime adapter files")
        with progress.bar("export", total=3, unit="step") as bar, \
                export_stream.on_device(dev):
            return _swappable(base, base_spec, adapter_specs, out, inputs, config, task,
                              weights, dtype, opset, atol, verify, seed, bar, t0, force)
    with progress.bar("export", total=4 if with_past else 3, unit="step") as bar, \
            export_stream.on_device(dev):
        return _export(base, base_spec, adapter_specs, out, inputs, config, task, weights,
                       dtype, opset, atol, verify, seed, with_past, bar, t0, force, stream)


def _swappable(base: Any, base_spec: str, specs: list[str], out: Path, inputs: list[Path],
               config: Any, task: str, weights: list[float], dtype: str, opset: int | None,
               atol: float, verify: bool, seed: int, bar: Any, t0: float, force: bool
               ) -> dict[str, Any]:
    """The base graph with LoRA inputs (streamed: any size) and one onnxruntime adapter file
    per adapter, checked by switching adapters in one session (export_adapters)."""

    adapters = [read_any(s, base_spec) for s in specs]
    modules, rank, per = xa.lora_plan(adapters, specs, base)
    names = input_names(export_stream.meta_model(config, task, dtype).model, config)
    vocab, types, pad = _vocab(config)
    output = "logits" if task == "causal-lm" else "last_hidden_state"
    bar.update(1)
    with Stage(out, inputs, force) as stage:
        tmp = stage.tmp
        assert tmp is not None
        example = _batch(names, 2, 8, vocab, types, pad, torch.Generator().manual_seed(seed))
        info = export_stream.write_streamed(base, config, task, {}, dtype, opset, tmp, example,
                                            names, output, lora=(modules, rank))
        files, unused = xa.write_adapters(tmp, per, weights, specs, rank, dtype,
                                          info["lora_inputs"])
        graph_opset = _check_opset(tmp / "model.onnx", opset)
        bar.update(1)
        result: dict[str, Any] = {"checked": False}
        if verify:
            g = torch.Generator().manual_seed(seed + 1)
            batches = [_batch(names, b, s, vocab, types, pad, g, padded=b > 1)
                       for b, s in ((1, 5), (3, 17))]

            result = _check_swappable(tmp, info, base, config, task, dtype, opset, example,
                                      names, output, adapters, weights, specs, per, rank,
                                      modules, files, batches, atol)
        bar.update(1)
        not_copied = copy_config_files(base.folder, tmp)
        report = {"base": base_spec, "adapters": specs, "weights": weights, "task": task,
                  "architecture": (config.architectures or [None])[0], "inputs": names,
                  "outputs": [output], "dynamic_axes": {"batch": 0, "sequence": 1},
                  "dtype": dtype, "opset": graph_opset, "adapter_files": files,
                  "lora": {"modules": len(modules) - len(unused), "rank": rank,
                           "outside_the_graph": unused}, "verification": result,
                  "streamed": info | {"lora_inputs": len(info["lora_inputs"])},
                  "tensors_changed_by_adapters": 0, "with_past": None,
                  "not_copied": not_copied}
        return _publish(stage, report, out, t0)


def _check_swappable(tmp: Path, info: dict[str, Any], base: Any, config: Any, task: str,
                     dtype: str, opset: int | None, example: dict[str, Any], names: list[str],
                     output: str, adapters: list[Any], weights: list[float], specs: list[str],
                     per: list[Any], rank: int, modules: list[str], files: list[str],
                     batches: list[Any], atol: float) -> dict[str, Any]:
    """The swappable graph in one session, switching adapters, against transformers' merged
    models: whole when small, else a copy of its first layer written the same way."""

    cut = export_stream.verification_cut(config, info["bytes"])
    cfg, folder = (config, tmp) if cut is None else (cut[0], tmp / ".verify")

    def reference(i: int | None) -> Any:  # the base, or the base with adapter i merged
        m = _load_model(base.folder, task, cfg)
        if i is not None:
            _merge_in_memory(m, base, [adapters[i]], [weights[i]], [specs[i]], partial=True)
        return export_stream.reference_run(
            export_stream.wrapper(m.half() if dtype == "fp16" else m, task))

    if cut is None:
        return xa.check(tmp, "model.onnx", files, reference, batches, atol) | {
            "mode": "whole model"}
    folder.mkdir()
    try:
        small = export_stream.write_streamed(base, cfg, task, {}, dtype, opset, folder,
                                             example, names, output, lora=(modules, rank))
        sub = xa.write_adapters(folder, per, weights, specs, rank, dtype,
                                small["lora_inputs"])[0]
        result = xa.check(folder, "model.onnx", sub, reference, batches, atol)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result | {"mode": export_stream.cut_mode(cut[1])}


def _vocab(config: Any) -> tuple[int, int, int]:
    """Vocabulary size, token types and pad id: what random test batches need."""
    pad = getattr(config, "pad_token_id", None)
    return (int(getattr(config, "vocab_size", 1000)),
            int(getattr(config, "type_vocab_size", 0) or 0), int(pad) if isinstance(pad, int)
            else 0)


def _prepare(base: Any, adapters: list[Any], weights: list[float], specs: list[str],
             config: Any, task: str, dtype: str, stream: bool) -> tuple[Any, ...]:
    """The model merged in memory (and its wrapper), or for ``stream`` only the edits:
    (model, wrapper, edits, tensors changed, input names)."""
    if stream:
        edits = plan_edits(base, adapters, weights, specs)[0] if adapters else {}
        names = input_names(export_stream.meta_model(config, task, dtype).model, config)
        return None, None, edits, len(edits), names
    model = _load_model(base.folder, task, config)
    changed = _merge_in_memory(model, base, adapters, weights, specs)
    if dtype == "fp16":
        model = model.half()
    return model, export_stream.wrapper(model, task), {}, changed, input_names(model, config)


def _export(base: Any, base_spec: str, adapter_specs: list[str], out: Path, inputs: list[Path],
            config: Any, task: str, weights: list[float], dtype: str, opset: int | None,
            atol: float, verify: bool, seed: int, with_past: bool, bar: Any, t0: float,
            force: bool, stream: bool) -> dict[str, Any]:
    """load → merge in memory → trace → verify → (KV-cache graphs) → publish; with ``stream``
    trace the meta model and write the merged weights tensor by tensor (export_stream)."""

    adapters = [read_any(s, base_spec) for s in adapter_specs]
    model, wrapper, edits, changed, names = _prepare(base, adapters, weights, adapter_specs,
                                                     config, task, dtype, stream)
    bar.update(1)
    vocab, types, pad = _vocab(config)

    output = "logits" if task == "causal-lm" else "last_hidden_state"
    with Stage(out, inputs, force) as stage:
        tmp = stage.tmp
        assert tmp is not None
        example = _batch(names, 2, 8, vocab, types, pad,  # seq ≥ 2 (NOTES: 1 bakes a branch)
                         torch.Generator().manual_seed(seed))
        streamed = None
        if stream:
            streamed = export_stream.write_streamed(base, config, task, edits, dtype, opset,
                                                    tmp, example, names, output)
        else:
            _trace(wrapper, example, names, output, tmp / "model.onnx", opset, config)
        graph_opset = _check_opset(tmp / "model.onnx", opset)
        bar.update(1)
        result: dict[str, Any] = {"checked": False}
        if verify and stream:
            def merged(cfg: Any) -> Any:  # the reference: what the in-memory export checks
                m = _load_model(base.folder, task, cfg)
                _merge_in_memory(m, base, adapters, weights, adapter_specs, partial=True)
                return export_stream.wrapper(m.half() if dtype == "fp16" else m, task)

            result = export_stream.verify_streamed(
                tmp, streamed, base, config, task, edits, dtype, opset, example, names, output,
                merged, lambda w, path: _verify(w, path, names, vocab, types, pad, seed + 1,
                                                atol))
        elif verify:
            result = _verify(wrapper, tmp / "model.onnx", names, vocab, types, pad, seed + 1,
                             atol)
            wrapper.cpu()  # verification may have moved it to the GPU
        bar.update(1)
        cached = None
        if with_past:
            cached = export_cache.with_past(model, config, tmp, vocab, opset, seed + 2,
                                            verify, atol)
            bar.update(1)
        not_copied = copy_config_files(base.folder, tmp)
        report = {"base": base_spec, "adapters": adapter_specs, "weights": weights,
                  "task": task, "architecture": (config.architectures or [None])[0],
                  "inputs": names, "outputs": [output],
                  "dynamic_axes": {"batch": 0, "sequence": 1}, "dtype": dtype,
                  "opset": graph_opset, "tensors_changed_by_adapters": changed,
                  "verification": result, "with_past": cached, "not_copied": not_copied,
                  "streamed": streamed,
                  "files": sorted(p.name for p in tmp.iterdir())}
        return _publish(stage, report, out, t0)


def _publish(stage: Any, report: dict[str, Any], out: Path, t0: float) -> dict[str, Any]:
    """export.json beside the graph, then the folder into place; the report completed."""
    (stage.tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    report["files"] = sorted(p.name for p in stage.tmp.iterdir())
    stage.publish()
    report["output"] = str(out)
    report["seconds"] = time.perf_counter() - t0
    return report
