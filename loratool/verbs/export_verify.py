"""How ``export`` verifies what it wrote, before anything is published: the graph in
onnxruntime against PyTorch on random token batches of shapes other than the traced one (one
of them padded; padded positions are not compared), on the device ``--device`` names.

A streamed graph is checked against the model transformers loads with the adapters merged in
memory, whole when small, else on a copy of its first layers exported by the same code; a
graph with LoRA inputs in one session that switches adapters per run, each against its own
merged model. Above ``atol`` the export fails and nothing is written.

Example::
    with on_device(torch.device("cpu")):
        result = verify_graph(wrapper(model, "causal-lm"), tmp / "model.onnx", names, v,
                              seed=1, atol=1e-4)
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import numpy.typing as npt
import torch

from ..engine.plan import Edit
from ..errors import LoraToolError
from ..headers.checkpoint import Checkpoint
from ..model.adapter import LoraAdapter
from ..options import Options
from ..reports.export import Streamed, Switch, SwitchVerification, Verification
from . import export_stream
from .export_adapters import LoraPlan, write_adapters
from .export_model import GraphSpec, Vocab, Wrapper, batch, load_model, merge_in_memory, wrapper

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Feed = dict[str, torch.Tensor]
Forward = Callable[[Feed], npt.NDArray[np.float32]]  # a reference model: feed → output

# where verification runs (export --device): set for one export by ``on_device``
_DEVICE: list[torch.device] = []
SHAPES = ((1, 5), (3, 17))  # (batch, sequence) of the checked batches: not the traced (2, 8)


class on_device:
    """``with on_device(dev):`` verification of this export runs on ``dev``: onnxruntime's
    CUDA provider and the PyTorch reference on the GPU for ``cuda``."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev

    def __enter__(self) -> None:
        if self.dev.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise LoraToolError("--device cuda: this onnxruntime has no CUDA provider; "
                                    "install onnxruntime-gpu (in place of onnxruntime), or "
                                    "use --device cpu")
        _DEVICE.append(self.dev)

    def __exit__(self, *exc: object) -> None:
        _DEVICE.pop()


def providers() -> list[str]:
    """onnxruntime's providers for the device verification runs on."""
    if _DEVICE and _DEVICE[-1].type == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def reference_run(module: torch.nn.Module) -> Forward:
    """``module`` on the verification device, as a function of a CPU feed → numpy output."""

    dev = _DEVICE[-1] if _DEVICE else torch.device("cpu")
    module = module.to(dev)

    def run(feed: Feed) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            out: npt.NDArray[np.float32] = module(**{k: v.to(dev) for k, v in feed.items()}) \
                .float().cpu().numpy()
            return out
    return run


def batches(names: list[str], v: Vocab, seed: int) -> list[Feed]:
    """The checked batches: one of each of :data:`SHAPES`, all but a single row padded."""
    g = torch.Generator().manual_seed(seed)
    return [batch(names, b, s, v, g, padded=b > 1) for b, s in SHAPES]


def verify_graph(module: torch.nn.Module, path: Path, names: list[str], v: Vocab, seed: int,
                 atol: float) -> Verification:
    """The graph at ``path`` in onnxruntime against ``module`` in PyTorch."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=providers())
    except Exception as e:  # onnxruntime's own errors share no base class
        raise LoraToolError(f"verification failed: onnxruntime cannot load the exported graph "
                            f"({str(e).splitlines()[0][:200]}); nothing was written") from e
    worst, shapes = 0.0, []
    forward = reference_run(module)
    for b in batches(names, v, seed):
        ref = forward(b)
        got = sess.run(None, {k: t.numpy() for k, t in b.items()})[0].astype(np.float32)
        keep = b["attention_mask"].numpy().astype(bool)
        if not (np.isfinite(ref[keep]).all() and np.isfinite(got[keep]).all()):
            raise LoraToolError("verification failed: the outputs hold NaN or Inf (in "
                                "PyTorch or ONNX; fp16 overflow?); nothing was written")
        worst = max(worst, float(np.abs(got - ref)[keep].max()))
        shapes.append(list(b["input_ids"].shape))
    if not worst <= atol:
        raise LoraToolError(f"verification failed: ONNX and PyTorch outputs differ by "
                            f"{worst:.3g} > --atol {atol:g}; nothing was written")
    return Verification(checked=True, shapes=shapes, max_abs_diff=worst, atol=atol, ok=True)


def verify_streamed(folder: Path, streamed: Streamed, base: Checkpoint, graph: GraphSpec,
                    edits: dict[str, Edit], reference: Callable[[PretrainedConfig], Wrapper],
                    check: Callable[[Wrapper, Path], Verification],
                    options: Options | None = None) -> Verification:
    """The streamed graph against ``reference(config)`` (the merged PyTorch model): the whole
    model when it is small, else a copy of its first layers exported the same way (so memory
    stays small)."""

    gc.collect()  # the traced graph's memory, before the reference model takes its own
    cut = export_stream.verification_cut(graph.config, streamed.bytes)
    if cut is None:
        return dataclasses.replace(check(reference(graph.config), folder / "model.onnx"),
                                   mode="whole model")
    small, n = cut
    sub = folder / ".verify"
    sub.mkdir()
    try:
        export_stream.write_streamed(base, dataclasses.replace(graph, config=small), edits,
                                     sub, options=options)
        result = check(reference(small), sub / "model.onnx")
    finally:
        shutil.rmtree(sub, ignore_errors=True)
    return dataclasses.replace(result, mode=export_stream.cut_mode(n))


def check_switches(folder: Path, files: list[str], references: Callable[[int | None], Forward],
                   feeds: list[Feed], atol: float, mode: str) -> SwitchVerification:
    """In one session of ``folder/model.onnx``: no adapter against the base, then each
    adapter file against the base with that adapter merged (``references(i)``; ``None`` the
    base)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # LoRA inputs are initializers by design: no warnings about it

    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=providers())
    results = []
    for i in [None, *range(len(files))]:
        run = ort.RunOptions()
        if i is not None:
            lora = ort.LoraAdapter()
            lora.Load(str(folder / files[i]))
            run.add_active_adapter(lora)
        ref = references(i)
        worst = 0.0
        for feed in feeds:
            want = ref(feed)
            got = sess.run(None, {k: v.numpy() for k, v in feed.items()}, run)[0]
            keep = feed["attention_mask"].numpy().astype(bool)
            worst = max(worst, float(np.abs(got.astype(np.float32) - want)[keep].max()))
        results.append(Switch(adapter=None if i is None else files[i], max_abs_diff=worst))
        if not worst <= atol:
            which = "the base (no adapter active)" if i is None else files[i]
            raise LoraToolError(f"verification failed: with {which}, ONNX and PyTorch differ "
                                f"by {worst:.3g} > --atol {atol:g}; nothing was written")
    return SwitchVerification(checked=True, ok=True, atol=atol, switches=results,
                              max_abs_diff=max(r.max_abs_diff for r in results), mode=mode)


def check_swappable(tmp: Path, streamed: Streamed, base: Checkpoint, graph: GraphSpec,
                    adapters: list[LoraAdapter], weights: list[float], specs: list[str],
                    plan: LoraPlan, files: list[str], feeds: list[Feed], atol: float,
                    options: Options | None = None) -> SwitchVerification:
    """The swappable graph in one session, switching adapters, against transformers' merged
    models: whole when small, else a copy of its first layer written the same way."""

    cut = export_stream.verification_cut(graph.config, streamed.bytes)
    cfg = graph.config if cut is None else cut[0]

    def reference(i: int | None) -> Forward:  # the base, or the base with adapter i merged
        m = load_model(base.folder, graph.task, cfg)
        if i is not None:
            merge_in_memory(m, base, [adapters[i]], [weights[i]], [specs[i]], partial=True)
        return reference_run(wrapper(m.half() if graph.dtype == "fp16" else m, graph.task))

    if cut is None:
        return check_switches(tmp, files, reference, feeds, atol, "whole model")
    folder = tmp / ".verify"
    folder.mkdir()
    try:
        small = export_stream.write_streamed(base, dataclasses.replace(graph, config=cfg), {},
                                             folder, lora=(plan.modules, plan.rank),
                                             options=options)
        sub = write_adapters(folder, plan, weights, specs, graph.dtype, small.lora_inputs)
        return check_switches(folder, sub.files, reference, feeds, atol,
                              export_stream.cut_mode(cut[1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
