"""Merging into a whole diffusers pipeline folder (``model_index.json`` with one subfolder per
component): each component an adapter changes (``unet`` or ``transformer``, ``text_encoder``,
``text_encoder_2`` …) is merged by the streaming merge of one checkpoint, every other file
and folder is carried over as it is, and the whole output appears at once.

Example: ``run("sdxl/", ["style.safetensors"], Path("sdxl-style"), weights=None, sign=1)``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (before the clock starts, as merge.run does)

from ..errors import FormatError
from ..formats import read_any, require_resolved
from ..headers.paths import containment_root, copy_tree, entries
from ..io.staging import Stage
from ..io.tensors import open_checkpoint
from ..model.adapter import component_folder, is_pipeline, only_component
from ..numerics.device import resolve_device, streaming_threads
from ..options import check_dtype, check_weights
from ..progress import SILENT, Progress
from ..verbs import merge


@streaming_threads()  # the CLI's merge: fewer threads than cores (see streaming_threads)
def run(base_spec: str, adapter_specs: list[str], out: Path, *, weights: list[float] | None,
        sign: float, device: str = "auto", dtype: str = "keep",
        max_shard_size: str | int = "5GB", force: bool = False, untie: bool = False,
        verify: bool = False, record: bool = True, quant: str | None = None,
        progress: Progress = SILENT) -> dict[str, Any]:
    """Merge (sign +1) or unmerge (sign −1) adapters into a pipeline folder, or, for any other
    base, exactly what ``merge.run`` does."""

    kw = dict(device=device, dtype=dtype, max_shard_size=max_shard_size, force=force,
              untie=untie, verify=verify, record=record, quant=quant, progress=progress)
    if not is_pipeline(base_spec) or not adapter_specs:
        return merge.run(base_spec, adapter_specs, out, weights=weights, sign=sign, **kw)

    t0 = time.perf_counter()
    if quant is not None:
        raise FormatError("--quant applies to GGUF models; for a pipeline use --dtype")
    weights = check_weights(weights, len(adapter_specs))
    check_dtype(dtype)
    dev = resolve_device(device)
    root = Path(base_spec)
    within = containment_root(root)
    listing = entries(root, within)  # every entry inside the pipeline; special files refused
    folders = {name for name, _, is_dir in listing if is_dir}
    parts: dict[str, list[tuple[Any, float, str]]] = {}
    for spec, w in zip(adapter_specs, weights):
        ad = read_any(spec, base_spec)  # kohya names resolve against each component
        require_resolved(ad, spec)
        if ad.full:
            raise FormatError(f"{spec}: holds full tensors (modules_to_save), which name no "
                              "pipeline component; merge it into the component's folder")
        for comp in ad.components:
            parts.setdefault(component_folder(comp, folders, spec), []).append(
                (only_component(ad, comp), w, spec))
    inputs = [p for p in [root, *map(Path, adapter_specs)] if p.exists()]
    reports: dict[str, Any] = {}
    with Stage(out, inputs=inputs, force=force) as stage:
        assert stage.tmp is not None
        for name, real, is_dir in listing:
            dest = stage.tmp / name
            if name in parts:
                ads, ws, specs = (list(x) for x in zip(*parts[name]))
                reports[name] = merge.merge_checkpoint(
                    open_checkpoint(str(root / name), progress), str(root / name), ads, ws,
                    specs, dest, inputs, sign=sign, dev=dev, dtype=dtype,
                    max_shard_size=max_shard_size, force=False, untie=untie, verify=verify,
                    record=record, progress=progress, t0=time.perf_counter())
            elif is_dir:
                copy_tree(root / name, dest, within, root)
            else:
                shutil.copyfile(real, dest)
        stage.publish()
    for name, r in reports.items():
        r["output"] = str(Path(out) / name)
    return {"output": str(out), "base": base_spec, "pipeline": True,
            "adapters": [{"adapter": a, "weight": w} for a, w in zip(adapter_specs, weights)],
            "components": reports, "carried_over": sorted(
                name for name, _, _ in listing if name not in parts),
            "seconds": time.perf_counter() - t0}
