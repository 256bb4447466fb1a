"""``merge`` and ``unmerge``: fold adapters into a model and take them out again, into a model
folder or safetensors file, a llama.cpp GGUF file, or a whole diffusers pipeline — one
streaming engine (``engine.kernel``) behind the three.

Example::

    import loratool
    report = loratool.merge("base/", ["style/", "task/"], "merged/", weights=[0.7, 1.0])
    print(report.tensors_changed, report.max_abs_delta)
    loratool.unmerge("merged/", ["style/", "task/"], "base-again/", weights=[0.7, 1.0])
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from ..errors import LoraToolError
from ..formats import read_any
from ..formats.sgm_names import single_file_config, to_single_file
from ..headers.paths import is_pipeline
from ..io.tensors import open_checkpoint
from ..numerics.device import resolve_device, streaming_threads
from ..numerics.nf4 import FourBit
from ..options import Options, check_dtype, check_weights
from ..progress import SILENT, Progress
from ..reports.merge import GgufMergeReport, MergeReport, PipelineMergeReport
from . import merge_checkpoint, merge_gguf, merge_pipeline, merge_qlora, prechecks
from .merge_settings import MergeSettings, Part, existing

PathLike = str | os.PathLike[str]


def merge(base: PathLike, adapters: list[PathLike], out: PathLike, *,
          weights: list[float] | None = None, device: str = "auto", dtype: str = "keep",
          max_shard_size: str | int = "5GB", untie: bool = False, verify: bool = False,
          record: bool = True, exact_record: bool = True, quant: str | None = None,
          imatrix: PathLike | None = None, qlora: str | FourBit | None = None,
          qlora_config: PathLike | None = None, force: bool = False,
          options: Options | None = None, progress: Progress = SILENT
          ) -> MergeReport | GgufMergeReport | PipelineMergeReport:
    """Fold ``adapters`` (paths or Hub ids, any format) into ``base`` and write ``out``.

    ``base`` may be a model folder or safetensors file (the result loads in transformers or
    diffusers; in float32 it equals PEFT's ``merge_and_unload`` bit for bit), a ``.gguf``
    file (``out`` a ``.gguf``; ``quant`` re-types changed tensors; ``imatrix``, a llama.cpp
    importance matrix, weights their K-quants as llama-quantize does), or a diffusers pipeline
    folder. ``weights``: one per adapter (default 1). ``dtype``: keep, fp32, bf16 or fp16.
    ``record``: write ``loratool-unmerge.safetensors`` so that :func:`unmerge` can undo
    replaced tensors and DoRA; ``exact_record``: with it, the values (W + ΔW) − ΔW does not give
    back (about 1 % of them), so that :func:`unmerge` gives the base back bit for bit.
    ``verify``: check the output against float64 before it is published.
    ``qlora`` (a transformers model folder): the adapters were trained on the base quantized
    by bitsandbytes (QLoRA); fold them into dequantize(quantize(W)) of every tensor it
    quantizes, as trained: ``"nf4"``, ``"fp4"``, a :class:`loratool.numerics.nf4.FourBit`
    (block size, double quantization, dtypes), or ``"auto"`` (read from ``qlora_config``, a
    JSON file with a ``quantization_config``, or from beside the adapter). Raises
    :class:`loratool.LoraToolError` (nothing is written) on bad input.

    Example::

        r = loratool.merge("base/", ["adapter/"], "merged/", dtype="bf16")
        r.tensors_changed, r.seconds
        loratool.merge("base/", ["qlora/"], "m/", qlora=FourBit("nf4", double_quant=True))
    """
    return _run(1.0, base, adapters, out, weights=weights, device=device, dtype=dtype,
                max_shard_size=max_shard_size, untie=untie, verify=verify, record=record,
                exact=exact_record, quant=quant, imatrix=imatrix, force=force, options=options,
                progress=progress, qlora=qlora, qlora_config=qlora_config)


def unmerge(merged: PathLike, adapters: list[PathLike], out: PathLike, *,
            weights: list[float] | None = None, device: str = "auto", dtype: str = "keep",
            max_shard_size: str | int = "5GB", untie: bool = False, verify: bool = False,
            force: bool = False, options: Options | None = None, progress: Progress = SILENT
            ) -> MergeReport | PipelineMergeReport:
    """Take ``adapters`` back out of ``merged`` (the same deltas subtracted in float32, with
    the same ``weights``); tensors an adapter replaced in full and DoRA merges come back
    exactly from what :func:`merge` recorded.

    Example::

        loratool.unmerge("merged/", ["adapter/"], "base-again/")
    """
    report = _run(-1.0, merged, adapters, out, weights=weights, device=device, dtype=dtype,
                  max_shard_size=max_shard_size, untie=untie, verify=verify, record=False,
                  exact=False, quant=None, imatrix=None, force=force, options=options,
                  progress=progress)
    assert not isinstance(report, GgufMergeReport)  # a GGUF unmerge is refused
    return report


def _run(sign: float, base: PathLike, adapters: list[PathLike], out: PathLike, *,
         weights: list[float] | None, device: str, dtype: str, max_shard_size: str | int,
         untie: bool, verify: bool, record: bool, exact: bool, quant: str | None,
         imatrix: PathLike | None, force: bool, options: Options | None, progress: Progress,
         qlora: str | FourBit | None = None, qlora_config: PathLike | None = None
         ) -> MergeReport | GgufMergeReport | PipelineMergeReport:
    """The one entry of every merge: check, then the pipeline, GGUF or checkpoint path, with
    torch's threads as ``options`` sets them (see ``streaming_threads``)."""
    t0 = time.perf_counter()
    base_spec, specs, out = os.fspath(base), [os.fspath(a) for a in adapters], Path(out)
    if not specs:
        raise LoraToolError("name at least one ADAPTER")
    ws = check_weights(weights, len(specs))
    check_dtype(dtype)
    options = options or Options()
    s = MergeSettings(sign, resolve_device(device), dtype, max_shard_size, force, untie,
                      verify, record, exact, quant,
                      None if imatrix is None else os.fspath(imatrix), options, progress)
    if qlora is not None or qlora_config is not None:
        prechecks.qlora_applies(sign < 0, quant, is_pipeline(base_spec))
    with streaming_threads(options):
        if is_pipeline(base_spec):
            return merge_pipeline.merge_pipeline(base_spec, specs, out, ws, s, t0)
        ckpt = open_checkpoint(base_spec, progress)
        parts = [Part(read_any(spec, base_spec), w, spec) for spec, w in zip(specs, ws)]
        single = single_file_config(ckpt.tensors)
        if single is not None:  # Stable Diffusion in one file: pipeline names → its own
            for p in parts:
                p.adapter = to_single_file(p.adapter, ckpt.tensors, single, p.spec)
        inputs = existing([base_spec, *specs])
        if (qlora is not None or qlora_config is not None) and ckpt.gguf is None:
            s = dataclasses.replace(s, qlora=merge_qlora.resolve(
                qlora or "auto", qlora_config, ckpt, base_spec, specs))
        elif qlora is not None or qlora_config is not None:
            raise prechecks.qlora_gguf()
        if ckpt.gguf is not None:  # llama.cpp's model: its own writer, quantized tensors
            return merge_gguf.merge_into_gguf(ckpt, parts, out, inputs, s, t0)
        if quant is not None or imatrix is not None:
            raise prechecks.quant_not_gguf(pipeline=False, imatrix=quant is None)
        return merge_checkpoint.merge_into(ckpt, base_spec, parts, out, inputs, s, t0)
