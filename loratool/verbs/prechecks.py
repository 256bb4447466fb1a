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
from ..headers import changes, moe
from ..headers.adapters import UNKNOWN_KIND_MARKS, describe, detect
from ..headers.checkpoint import is_gguf, open_checkpoint
from ..headers.paths import check_exists, check_regular, is_pipeline
from ..headers.safetensors import TensorInfo, dtype_bytes, read_exactly
from ..io.staging import MODEL_OUTPUT, REPORT_OUTPUT, OutputKind, check_output
from ..options import DTYPES, Budget, Fixed, RankPolicy, check_fixed


def local(*specs: str | os.PathLike[str] | None) -> list[Path]:
    """The specs that are local paths (a Hub id is resolved by the verb)."""
    return [Path(s) for s in specs if s is not None and Path(s).exists()]


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
    if any(mark in n for n in facts.full_tensors for mark in UNKNOWN_KIND_MARKS):
        return []  # not a full tensor but a key the reader does not know: it says so
    return sorted(facts.full_tensors)


# the refusals of full tensors, one wording each, shared with the verbs

def gguf_merge_full(spec: str, names: list[str]) -> FormatError:
    return FormatError(f"{spec}: holds full tensors that differ from the base's "
                       f"(modules_to_save: {', '.join(sorted(names)[:3])}); a GGUF merge takes "
                       "LoRA modules only: merge into the transformers model, then convert it")


def pipeline_merge_full(spec: str) -> FormatError:
    return FormatError(f"{spec}: holds full tensors (modules_to_save), which name no "
                       "pipeline component; merge it into the component's folder")


def export_inputs_full(spec: str, name: str) -> FormatError:
    return FormatError(f"{spec}: full tensors ({name} …) replace base weights; an onnxruntime "
                       "adapter can only add LoRA factors: export it merged instead (without "
                       "--adapters-as-inputs)")


def quant_not_gguf(pipeline: bool, imatrix: bool = False) -> FormatError:
    if imatrix:
        return FormatError("--imatrix applies to merges into GGUF models (the importance matrix "
                           "llama-quantize weights their K-quants with)")
    return FormatError("--quant applies to GGUF models; for "
                         f"{'a pipeline' if pipeline else 'safetensors'} use --dtype")


def qlora_applies(unmerge: bool, quant: str | None, pipeline: bool) -> None:
    """--qlora: a merge into a transformers model folder, nothing else."""
    if unmerge:
        raise UsageError("--qlora applies to merge: a QLoRA-faithful merge cannot be undone "
                         "into the float base (quantization lost it); keep the base instead")
    if quant is not None or pipeline:
        raise qlora_gguf() if quant is not None else UsageError(
            "--qlora applies to transformers model folders, not diffusers pipelines")


def qlora_gguf() -> UsageError:
    return UsageError("--qlora folds an adapter into bitsandbytes' dequantized base of a "
                      "transformers model folder; a GGUF model is already quantized its own "
                      "way: merge into the safetensors model, then convert it")


# --------------------------------------------------------------------------- per command

def merge(base: str, adapters: list[str], out: Path, *, force: bool, quant: str | None,
          unmerge: bool = False, imatrix: Path | None = None, qlora: bool = False,
          qlora_config: Path | None = None) -> None:
    """merge/unmerge: --quant and --imatrix only for a GGUF base (the importance matrix a
    regular file), --qlora only for a model folder's merge, the output free, and the full
    tensors that a pipeline merge cannot take."""
    if unmerge and quant is not None:
        raise UsageError("--quant applies to merges into GGUF models")
    gguf = Path(base).is_file() and is_gguf(Path(base))
    pipeline = is_pipeline(base)
    if qlora:
        qlora_applies(unmerge, quant, pipeline)
        if gguf:
            raise qlora_gguf()
    if quant is not None and not gguf and Path(base).exists():
        raise quant_not_gguf(pipeline)
    if imatrix is not None:
        if not gguf and Path(base).exists():
            raise quant_not_gguf(pipeline, imatrix=True)
    for given in (imatrix, qlora_config):  # a file, not a folder, a FIFO or a device
        if given is not None:
            check_exists(given)
            check_regular(given)
    output(out, [base, *adapters], force)
    if pipeline:  # (a GGUF merge takes full tensors that are the base's own: it reads them)
        for spec in adapters:
            if full_tensors(spec):
                raise pipeline_merge_full(spec)


def extract(base: str, tuned: str, out: Path, report_path: Path | None, *, force: bool,
            policy: RankPolicy | None = None, targets: list[str] | None = None,
            excludes: list[str] | None = None, embed_lora: bool = False,
            skip_full: bool = False, dtype: str = "keep") -> None:
    """extract: the adapter's output and the --report file free, and a --budget that what is
    written whatever the ranks (changed biases, norms, embeddings in full) already exceeds."""
    output(out, [base, tuned], force)
    if report_path is not None:
        output(report_path, [base, tuned, out], force, REPORT_OUTPUT)
    if policy is not None and policy.budget is not None:
        fixed = fixed_cost(base, tuned, policy.budget, targets or [], excludes or [],
                           embed_lora, skip_full, dtype)
        if fixed is not None:
            check_fixed(policy, fixed)


def fixed_cost(base: str, tuned: str, budget: Budget, targets: list[str], excludes: list[str],
               embed_lora: bool, skip_full: bool, dtype: str) -> list[Fixed] | None:
    """What extract writes whatever the ranks, found as extract finds it (the same tensors,
    in the same order, with the same labels) but from the bytes of the tensors it stores in
    full, without torch; None where the headers cannot tell (a Hub id, GGUF, a pickle, base
    and tuned of different dtypes)."""
    if not (Path(base).exists() and Path(tuned).exists()):
        return None
    try:
        b, t = open_checkpoint(base), open_checkpoint(tuned)
    except LoraToolError:
        return None  # the verb says what is wrong, in full
    if b.gguf is not None or t.gguf is not None:
        return None
    names = changes.pairs(b, t, targets, excludes)
    cfg = t.config or b.config or {}
    model_type = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None
    embedding = (changes.input_embedding(b.tensors)
                 if changes.ties_embeddings(cfg, b.tensors) else None)
    blocks = ({n for items in moe.group(names).values() for _, n, _ in items}
              if model_type in moe.FUSING_TYPES else set())
    fixed: list[Fixed] = []

    def fix(label: str, info: TensorInfo, hint: str | None) -> None:
        size = dtype_bytes(DTYPES[dtype] or info.dtype)
        fixed.append(Fixed(label, budget.cost(info.params, size), hint))

    for name in names:
        bi, ti = b.tensors[name], t.tensors[name]
        if bi.offset < 0 or ti.offset < 0 or bi.dtype != ti.dtype:
            return None  # not two safetensors tensors whose bytes compare
        if bi.shape != ti.shape:
            fix(changes.RESIZED, ti, None)
            continue
        if name in blocks or changes.kind(name, ti.shape, model_type, embed_lora) != "full":
            continue
        differ = _differ(bi, ti)
        if differ is None:
            return None
        if not differ:
            continue
        if name.endswith(".bias"):
            fix(changes.BIAS_CHANGES, ti, None)
        elif not skip_full:
            label, hint = changes.stored_in_full(name, embed_lora)
            for _ in range(2 if name == embedding else 1):  # a tied head carries a copy
                fix(label, ti, hint)
    return fixed


_ZERO = {2: (0x0000, 0x8000), 4: (0x00000000, 0x80000000)}  # +0 and −0 as bits
_CHUNK = 1 << 20


def _differ(a: TensorInfo, b: TensorInfo) -> bool | None:
    """Whether two tensors of one float dtype hold different values: bytes that differ, unless
    only in the sign of zeros (equal values, which extract does not store); None when they
    cannot be read (the verb says why)."""
    size = dtype_bytes(a.dtype)
    zero = _ZERO.get(size)
    try:
        with open(a.file, "rb", buffering=0) as fa, open(b.file, "rb", buffering=0) as fb:
            for start in range(0, a.nbytes, _CHUNK):
                n = min(_CHUNK, a.nbytes - start)
                x, y = bytearray(n), bytearray(n)
                read_exactly(fa, memoryview(x), a.offset + start, a)
                read_exactly(fb, memoryview(y), b.offset + start, b)
                if x == y:
                    continue
                if zero is None:
                    return True
                code = "H" if size == 2 else "I"
                for u, v in zip(memoryview(x).cast(code), memoryview(y).cast(code)):
                    if u != v and not (u in zero and v in zero):
                        return True
    except (OSError, LoraToolError):
        return None
    return False


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
