"""The checks that need no tensor, made before torch is imported.

The command line runs them before it loads a verb's module (and with it torch, 1–10 s), so
that an output that exists, flags that cannot go together, or an adapter whose full tensors
a mode cannot take are refused at once. The verbs refuse the same things again on what they
resolved (a Hub id, a folder read whole): these checks only see local paths, and say nothing
where the headers cannot tell. This module imports no torch (``tests/test_layers.py``).

Example::
    prechecks.merge("base/", ["adapter/"], Path("merged"), force=False, quant=None)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError, LoraToolError, UsageError
from ..headers.adapters import describe, detect
from ..headers.checkpoint import is_gguf, open_checkpoint
from ..io.staging import MODEL_OUTPUT, REPORT_OUTPUT, OutputKind, check_output


def local(*specs: str | os.PathLike[str] | None) -> list[Path]:
    """The specs that are local paths (a Hub id is resolved by the verb)."""
    return [Path(s) for s in specs if s is not None and Path(s).exists()]


def is_pipeline(spec: str | os.PathLike[str]) -> bool:
    """A local diffusers pipeline folder."""
    return (Path(spec) / "model_index.json").is_file()


def output(out: Path, inputs: list[str | os.PathLike[str] | None], force: bool,
           kind: OutputKind = MODEL_OUTPUT) -> None:
    """An output that exists (without ``force``), overlaps a local input, or is not one
    ``--force`` may replace: refused now."""
    check_output(Path(out), local(*inputs), force, kind)


def full_tensors(spec: str | os.PathLike[str]) -> list[str]:
    """The full tensors (``modules_to_save``) a local adapter's headers list; [] for a Hub id
    or what the headers cannot describe (the verb then says what is wrong)."""
    if not Path(spec).exists():
        return []
    try:
        ckpt = open_checkpoint(spec)
        kind, fmt = detect(ckpt)
        if kind != "adapter":
            return []
        facts, _ = describe(ckpt, fmt)
    except LoraToolError:
        return []
    return sorted(facts.full_tensors)


# the refusals of full tensors, one wording each, shared with the verbs

def gguf_merge_full(spec: str, names: list[str]) -> FormatError:
    return FormatError(f"{spec}: holds full tensors (modules_to_save: "
                       f"{', '.join(sorted(names)[:3])}); a GGUF merge takes LoRA modules only")


def pipeline_merge_full(spec: str) -> FormatError:
    return FormatError(f"{spec}: holds full tensors (modules_to_save), which name no "
                       "pipeline component; merge it into the component's folder")


def export_inputs_full(spec: str, name: str) -> FormatError:
    return FormatError(f"{spec}: full tensors ({name} …) replace base weights; an onnxruntime "
                       "adapter can only add LoRA factors: export it merged instead (without "
                       "--adapters-as-inputs)")


def quant_not_gguf(pipeline: bool) -> LoraToolError:
    return LoraToolError("--quant applies to GGUF models; for "
                         f"{'a pipeline' if pipeline else 'safetensors'} use --dtype")


# --------------------------------------------------------------------------- per command

def merge(base: str, adapters: list[str], out: Path, *, force: bool, quant: str | None,
          unmerge: bool = False) -> None:
    """merge/unmerge: --quant only for a GGUF base, the output free, and the full tensors
    that a GGUF or pipeline merge cannot take."""
    if unmerge and quant is not None:
        raise UsageError("--quant applies to merges into GGUF models")
    gguf = Path(base).is_file() and is_gguf(Path(base))
    pipeline = is_pipeline(base)
    if quant is not None and not gguf and Path(base).exists():
        raise quant_not_gguf(pipeline)
    output(out, [base, *adapters], force)
    if gguf or pipeline:
        for spec in adapters:
            full = full_tensors(spec)
            if full:
                raise gguf_merge_full(spec, full) if gguf else pipeline_merge_full(spec)


def extract(base: str, tuned: str, out: Path, report_path: Path | None, *, force: bool
            ) -> None:
    """extract: the adapter's output and the --report file free."""
    output(out, [base, tuned], force)
    if report_path is not None:
        output(report_path, [base, tuned, out], force, REPORT_OUTPUT)


def adapters_out(adapters: list[str], out: Path, *, force: bool) -> None:
    """combine/resize: the output free."""
    output(out, list(adapters), force)


def convert(adapter: str, out: Path, to: str, *, base: str | None, drop: bool,
            force: bool) -> None:
    """convert: the output free, and full tensors a kohya or GGUF file cannot hold (without
    --base, which may show them to be copies of the base's own, left out)."""
    output(out, [adapter, base], force)
    target = to
    if target in ("kohya", "gguf") and base is None and not drop:
        full = full_tensors(adapter)
        if full:
            raise FormatError(f"converting to {target} would lose {len(full)} full tensors "
                              "(modules_to_save); pass --drop-unsupported to write the rest "
                              "without them")


def export(base: str, adapters: list[str], out: Path, *, force: bool, as_inputs: bool
           ) -> None:
    """export: the output free, and full tensors a swappable graph cannot take."""
    output(out, [base, *adapters], force)
    if as_inputs:
        for spec in adapters:
            full = full_tensors(spec)
            if full:
                raise export_inputs_full(spec, full[0])
