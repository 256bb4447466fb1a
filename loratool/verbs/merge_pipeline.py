"""Merging into a whole diffusers pipeline folder (``model_index.json`` with one subfolder per
component): each component an adapter changes (``unet`` or ``transformer``, ``text_encoder``,
``text_encoder_2`` …) is merged by the streaming merge of one checkpoint, every other file
and folder is carried over as it is, and the whole output appears at once.

Example::
    report = merge_pipeline("sdxl/", ["style.safetensors"], Path("sdxl-style"), [1.0],
                            MergeSettings(1.0, torch.device("cpu")))
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from ..formats import read_any, require_resolved
from ..headers.paths import containment_root, copy_tree, entries
from ..io.staging import Stage
from ..io.tensors import open_checkpoint
from ..model.adapter import component_folder, only_component
from ..reports.merge import AdapterWeight, MergeReport, PipelineMergeReport
from . import merge_checkpoint, prechecks
from .merge_settings import MergeSettings, Part, existing


def merge_pipeline(base_spec: str, adapter_specs: list[str], out: Path, weights: list[float],
                   s: MergeSettings, t0: float | None = None) -> PipelineMergeReport:
    """Merge (``s.sign`` +1) or unmerge (−1) adapters into a pipeline folder."""

    t0 = time.perf_counter() if t0 is None else t0
    if s.quant is not None or s.imatrix is not None:
        raise prechecks.quant_not_gguf(pipeline=True, imatrix=s.quant is None)
    root = Path(base_spec)
    within = containment_root(root)
    listing = entries(root, within)  # every entry inside the pipeline; special files refused
    folders = {name for name, _, is_dir in listing if is_dir}
    parts: dict[str, list[Part]] = {}
    for spec, w in zip(adapter_specs, weights):
        ad = read_any(spec, base_spec)  # kohya names resolve against each component
        require_resolved(ad, spec)
        if ad.full:
            raise prechecks.pipeline_merge_full(spec)
        for comp in ad.components:
            parts.setdefault(component_folder(comp, folders, spec), []).append(
                Part(only_component(ad, comp), w, spec))
    inputs = existing([base_spec, *adapter_specs])
    reports: dict[str, MergeReport] = {}
    each = dataclasses.replace(s, force=False)  # inside the stage: each folder is new
    with Stage(out, inputs=inputs, force=s.force, options=s.options) as stage:
        assert stage.tmp is not None
        for name, real, is_dir in listing:
            dest = stage.tmp / name
            if name in parts:
                reports[name] = merge_checkpoint.merge_into(
                    open_checkpoint(str(root / name), s.progress), str(root / name),
                    parts[name], dest, inputs, each)
            elif is_dir:
                copy_tree(root / name, dest, within, root)
            else:
                shutil.copyfile(real, dest)
        stage.publish()
    for name, r in reports.items():
        r.output = str(Path(out) / name)
    return PipelineMergeReport(
        output=str(out), base=base_spec, pipeline=True,
        adapters=[AdapterWeight(a, w) for a, w in zip(adapter_specs, weights)],
        components=reports,
        carried_over=sorted(name for name, _, _ in listing if name not in parts),
        seconds=time.perf_counter() - t0)
