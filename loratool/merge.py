"""``loratool merge`` and ``unmerge``: fold adapters into base weights and take them out.

Streaming: one base tensor at a time goes reader → math → writer, the next one read in a
background thread while the current one is computed and written; unchanged tensors are copied
byte for byte (in the kernel where possible). Math is float32 on the chosen device, in PEFT's
order of operations (so fp32 results equal PEFT's ``merge_and_unload`` bit for bit), rounded
once to the output dtype. DoRA norms are recorded beside the output so that unmerge can undo
them.

Example::

    report = merge("base/", ["adapter/"], Path("merged"), weights=[1.0])
"""

from __future__ import annotations

import json
import math
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import FormatError, LoraToolError
from .options import DTYPES, check_dtype, check_weights, resolve_device

DORA_SIDECAR = "loratool-dora-norms.safetensors"


@dataclass
class Edit:
    """What happens to one output tensor."""

    source: str  # base tensor it starts from
    lora: list[tuple[Any, float]] = field(default_factory=list)  # (LoraModule, weight)
    bias: list[tuple[Any, float]] = field(default_factory=list)  # modules whose bias adds here
    full: tuple[Any, float] | None = None  # (replacement tensor, weight), applied first
    owner: str | None = None  # the adapter that replaces this tensor
    dora: tuple[Any, float] | None = None  # the one DoRA module on this tensor


def _single_model(ad: Any, spec: str) -> None:
    comps = ad.components
    if len(comps) > 1:
        raise FormatError(f"{spec}: the adapter spans components {comps}; merge one model at a "
                          "time (convert it per component)")
    for m in ad.modules.values():
        m.component = None


def plan_edits(base: Any, adapters: list[Any], weights: list[float], specs: list[str],
               untie: bool = False) -> tuple[dict[str, Edit], list[tuple[str, str]]]:
    """Which output tensors change and how, and the output tensor list ``(name, source)``."""
    from .adapter import match_base

    edits: dict[str, Edit] = {}
    cfg = base.config or {}
    tied = bool(cfg.get("tie_word_embeddings", False))
    order = [(n, n) for n in base.tensors]
    extra: list[tuple[str, str]] = []
    for ad, w, spec in zip(adapters, weights, specs):
        _single_model(ad, spec)
        lm = [k for k, m in ad.modules.items() if m.name.endswith("lm_head")
              and m.name + ".weight" not in base.tensors]
        if lm and tied:
            if not untie:
                raise FormatError(f"{spec}: adapts {lm[0]}, which this base ties to its input "
                                  "embeddings (tie_word_embeddings): merging would change the "
                                  "embeddings too. Pass --untie to write a separate lm_head")
            emb = next((n for n in base.tensors if n.endswith("embed_tokens.weight")
                        or n.endswith("wte.weight")), None)
            if emb is None:
                raise FormatError(f"{spec}: cannot find the tied input embedding to untie from")
            for k in lm:
                name = ad.modules[k].name + ".weight"
                if name not in [e[0] for e in extra]:
                    extra.append((name, emb))
        names = dict(base.tensors)
        for out_name, src in extra:
            names[out_name] = base.tensors[src]

        class View:  # the base as the adapter sees it, untied lm_head included
            tensors = names
            source = base.source
            path = base.path

        mapping = match_base(ad, View)
        for name, t in ad.full.items():
            e = edits.setdefault(name, Edit(name))
            if e.full is not None or e.lora or e.dora:
                raise FormatError(f"{spec}: full tensor {name} (modules_to_save) would replace "
                                  "a tensor another adapter also changes")
            e.full, e.owner = (t, w), spec
        for key, tname in mapping.items():
            m = ad.modules[key]
            src = dict(extra).get(tname, tname)
            e = edits.setdefault(tname, Edit(src))
            if e.full is not None and e.owner != spec:
                raise FormatError(f"{spec}: {key} changes {tname}, which another adapter "
                                  "replaces in full (modules_to_save)")
            if m.magnitude is not None:
                if e.lora or e.dora or e.full:
                    raise FormatError(f"{spec}: {key} has DoRA and another adapter changes the "
                                      "same weight; a DoRA magnitude does not add: merge it "
                                      "alone")
                if m.layout == "embedding":
                    raise FormatError(f"{spec}: DoRA on embedding {key} is not supported")
                e.dora = (m, w)
            else:
                if e.dora is not None:
                    raise FormatError(f"{spec}: {key} changes a weight that a DoRA adapter "
                                      "also changes; merge the DoRA adapter alone")
                e.lora.append((m, w))
            if m.bias is not None:
                bname = tname[: -len(".weight")] + ".bias"
                if bname not in base.tensors:
                    raise FormatError(f"{spec}: {key} has a lora bias but the base has no "
                                      f"{bname}")
                edits.setdefault(bname, Edit(bname)).bias.append((m, w))
    return edits, order + extra


def _apply(W: Any, e: Edit, sign: float, device: Any, norms: dict[str, Any],
           out_name: str, dora_norms: dict[str, Any] | None, stats: dict[str, float]) -> Any:
    """The merged (sign +1) or unmerged (sign −1) float32 tensor on ``device``; ``W`` is the
    caller's own float32 copy and may be changed in place."""
    import torch

    from . import ops

    if e.full is not None:
        t, w = e.full
        F = t.to(device=device, dtype=torch.float32, copy=True)  # W is changed in place
        if sign < 0:
            raise FormatError(f"{out_name}: a full replacement (modules_to_save) cannot be "
                              "unmerged: the base tensor it replaced is not recoverable")
        if F.shape != W.shape:
            if w != 1.0:
                raise FormatError(f"{out_name}: a resized full tensor cannot be weighted")
            W = F
        else:
            W = F if w == 1.0 else W + w * (F - W)
    for m, w in e.lora:
        # in place: W holds its own copy, and peak memory stays near three tensors
        d = ops.lora_delta(m.A.to(device, torch.float32), m.B.to(device, torch.float32),
                           m.scale, m.layout)
        if w != 1.0:
            d.mul_(w)
        if d.numel():
            lo, hi = torch.aminmax(d)
            stats["max_abs_delta"] = max(stats["max_abs_delta"], -float(lo), float(hi))
        W.add_(d) if sign > 0 else W.sub_(d)
        del d
    if e.dora is not None:
        m, w = e.dora
        d = ops.lora_delta(m.A.to(device, torch.float32), m.B.to(device, torch.float32),
                           m.scale, m.layout)
        mag = m.magnitude.to(device, torch.float32)
        stats["max_abs_delta"] = max(stats["max_abs_delta"], float(d.abs().max()))
        if sign > 0:
            merged, norm = ops.dora_merge(W, d, mag, m.layout)
            norms[out_name] = norm.cpu()
            W = merged if w == 1.0 else W + w * (merged - W)
        else:
            if dora_norms is None or out_name not in dora_norms:
                raise FormatError(f"{out_name}: DoRA cannot be undone from merged weights alone "
                                  f"(the row norms are lost); the merged folder lacks "
                                  f"{DORA_SIDECAR} written by `loratool merge`")
            if w != 1.0:
                raise FormatError(f"{out_name}: unmerging a weighted DoRA merge is not supported")
            W = ops.dora_unmerge(W, d, mag, dora_norms[out_name].to(device, torch.float32),
                                 m.layout)
    for m, w in e.bias:
        b = m.bias.to(device, torch.float32) * m.scale
        if w != 1.0:
            b = b * w
        W.add_(b) if sign > 0 else W.sub_(b)
    return W


ROW_CHUNK = 1 << 18  # elements per chunk: 1 MiB of float32 stays in cache


class Buffers:
    """Reused CPU buffers, grown as needed: fresh memory costs a page fault per 4 KiB, which
    on small VMs is slower than the reads and writes themselves."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, Any], Any] = {}

    def get(self, key: str, dtype: Any, numel: int) -> Any:
        import torch

        b = self.bufs.get((key, dtype))
        if b is None or b.numel() < numel:
            b = self.bufs[(key, dtype)] = torch.empty(numel, dtype=dtype)
        return b


def _apply_rows(t: Any, e: Edit, sign: float, out_dtype: Any, name: str,
                stats: dict[str, float], bufs: Buffers) -> Any:
    """The CPU path for plain LoRA: the same additions as :func:`_apply`, in PEFT's order,
    done a block of rows at a time so that the float32 copy, the check and the rounding stay
    in cache instead of streaming whole float32 tensors through memory several times."""
    import torch

    from . import ops

    deltas = []
    for k, (m, w) in enumerate(e.lora):
        # B@A now; the scale (and weight) per block below: the same products, in cache
        d = ops.lora_delta(m.A.to(torch.float32), m.B.to(torch.float32), 1.0, m.layout,
                           out=bufs.get(f"delta{k}", torch.float32, t.numel()), scaled=False)
        deltas.append((d, m.scale, w))
    out = bufs.get("out", out_dtype, t.numel())[: t.numel()].view(t.shape)
    rows = max(1, ROW_CHUNK // max(1, t[0].numel()))
    for s in range(0, t.shape[0], rows):
        W = t[s:s + rows].to(torch.float32, copy=True)
        for d, scale, wt in deltas:
            dc = d[s:s + rows].mul_(scale)
            if wt != 1.0:
                dc.mul_(wt)
            lo, hi = torch.aminmax(dc)
            stats["max_abs_delta"] = max(stats["max_abs_delta"], -float(lo), float(hi))
            W.add_(dc) if sign > 0 else W.sub_(dc)
        lo, hi = (float(x) for x in torch.aminmax(W))
        _check_extremes(lo, hi, out_dtype, name)  # per block: min()/max() would skip a NaN
        out[s:s + rows].copy_(W)
    return out


def _check_range(t: Any, out_dtype: Any, name: str) -> None:
    """Non-finite values and values out of range for fp16/bf16 are errors."""
    import torch

    if t.numel() and t.is_floating_point():
        lo, hi = (float(x) for x in torch.aminmax(t))
        _check_extremes(lo, hi, out_dtype, name)


def _check_extremes(lo: float, hi: float, out_dtype: Any, name: str) -> None:
    """From a tensor's min and max: ``aminmax`` propagates NaN, so finite extremes mean every
    value is finite; the larger magnitude must fit the output dtype."""
    import torch

    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise LoraToolError(f"{name}: the result holds NaN or Inf; nothing was written (check "
                            "the base, the adapter's values and --weight)")
    if out_dtype in (torch.float16, torch.bfloat16):
        big = max(-lo, hi)
        limit = torch.finfo(out_dtype).max
        if big > limit:
            raise LoraToolError(f"{name}: a value of {big:.4g} exceeds the largest "
                                f"{str(out_dtype).removeprefix('torch.')} ({limit:.4g}); "
                                "write with --dtype fp32 or bf16")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(base_spec: str, adapter_specs: list[str], out: Path, *, weights: list[float] | None,
        sign: float, device: str = "auto", dtype: str = "keep",
        max_shard_size: str | int = "5GB", force: bool = False, untie: bool = False,
        verify: bool = False, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Merge (sign +1) or unmerge (sign −1) adapters; returns the report."""
    import torch

    from .checkpoint import open_checkpoint, torch_dtype
    from .formats import read_any
    from .writer import CheckpointWriter

    t0 = time.perf_counter()
    if not adapter_specs:
        raise LoraToolError("name at least one ADAPTER")
    weights = check_weights(weights, len(adapter_specs))
    check_dtype(dtype)
    dev = resolve_device(device)
    base = open_checkpoint(base_spec)
    adapters = [read_any(s, base_spec) for s in adapter_specs]
    edits, order = plan_edits(base, adapters, weights, adapter_specs, untie)
    dora_norms = None
    if sign < 0 and any(e.dora for e in edits.values()):
        side = base.folder / DORA_SIDECAR
        if side.is_file():
            from safetensors.torch import load_file

            dora_norms = load_file(side)
    inputs = [p for p in [Path(base_spec), *map(Path, adapter_specs)] if p.exists()]
    out_code = DTYPES[dtype]

    def out_code_for(code: str) -> str:
        return out_code if out_code and code in ("F32", "BF16", "F16", "F64") else code

    plan = []
    for name, src in order:
        info = base.info(src)
        e = edits.get(name)
        shape = info.shape
        if e is not None and e.full is not None and tuple(e.full[0].shape) != shape:
            shape = tuple(e.full[0].shape)
        plan.append((name, out_code_for(info.dtype), shape))
    norms: dict[str, Any] = {}
    changed: list[dict[str, Any]] = []
    bytes_in = 0
    cfg_text = None
    if untie and any(n != s for n, s in order) and base.config is not None:
        cfg = dict(base.config)
        cfg["tie_word_embeddings"] = False
        cfg_text = json.dumps(cfg, indent=2) + "\n"

    bufs = Buffers()
    read_bufs = [Buffers(), Buffers()]  # double buffering: one read ahead, one in use

    def fetch(i: int, name: str, src: str) -> Any:
        """Read the next tensor (runs in the prefetch thread)."""
        info = base.info(src)
        if name in edits or info.offset < 0 or out_code_for(info.dtype) != info.dtype:
            return base.load(src, buffer=read_bufs[i % 2].get("read", torch.uint8,
                                                            info.nbytes))
        return None  # unchanged and same dtype: copied raw, nothing to read here

    writer = CheckpointWriter(out, inputs=inputs, force=force, max_shard_size=max_shard_size,
                              copy_from=base.folder, plan=plan,
                              metadata={"loratool": "merge" if sign > 0 else "unmerge",
                                        "loratool.base": base_spec,
                                        "loratool.adapters": json.dumps(
                                            [{"adapter": a, "weight": wt} for a, wt in
                                             zip(adapter_specs, weights)])})
    with writer as w, ThreadPoolExecutor(1) as pool:
        if cfg_text is not None:
            w.add_file("config.json", cfg_text)
        pending = pool.submit(fetch, 0, *order[0]) if order else None
        for i, (name, src) in enumerate(order):
            t = pending.result() if pending is not None else None
            pending = (pool.submit(fetch, i + 1, *order[i + 1]) if i + 1 < len(order)
                       else None)
            info = base.info(src)
            bytes_in += info.nbytes
            code = out_code_for(info.dtype)
            if t is None:
                info = base.local_info(src)
                w.add_raw(name, info.dtype, info.shape, info.file, info.offset, info.nbytes)
            elif name not in edits:
                odt = torch_dtype(code)
                if t.dtype != odt:
                    t32 = t.to(torch.float32)
                    _check_range(t32, odt, name)
                    t = t32.to(odt)
                w.add(name, t)
            else:
                e = edits[name]
                stats = {"max_abs_delta": 0.0}
                odt = torch_dtype(code)
                if dev.type == "cpu" and e.full is None and e.dora is None and not e.bias \
                        and t.dim() >= 2:
                    res = _apply_rows(t, e, sign, odt, name, stats, bufs)
                else:
                    W = t.to(device=dev, dtype=torch.float32, copy=True)
                    del t
                    new = _apply(W, e, sign, dev, norms, name, dora_norms, stats)
                    del W
                    _check_range(new, odt, name)
                    res = new.to(odt).cpu()
                    del new
                changed.append({"name": name, "max_abs_delta": stats["max_abs_delta"]})
                w.add(name, res)
                del res
            if progress:
                progress(info.nbytes)
        if norms:
            from safetensors.torch import save

            w.add_file(DORA_SIDECAR, save({k: v.contiguous() for k, v in norms.items()}))
    elapsed = time.perf_counter() - t0
    report: dict[str, Any] = {
        "operation": "merge" if sign > 0 else "unmerge", "base": base_spec,
        "adapters": [{"adapter": s, "weight": wt, "modules": len(a.modules),
                      "full_tensors": len(a.full), "format": a.source_format}
                     for s, a, wt in zip(adapter_specs, adapters, weights)],
        "output": str(out), "device": str(dev), "dtype": dtype,
        "tensors": len(order), "tensors_changed": len(changed),
        "max_abs_delta": max((c["max_abs_delta"] or 0.0 for c in changed), default=0.0),
        "dora_norms_recorded": len(norms), "seconds": elapsed,
        "gb_per_s": bytes_in / 1e9 / elapsed if elapsed > 0 else None,
        "bytes": bytes_in, "peak_rss_mb": _peak_rss_mb(),
    }
    if dev.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if verify:
        try:
            report["verify"] = verify_output(base, out, edits, sign, dora_norms, norms)
        except BaseException:
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # a wrong output must not stay behind
            raise
    return report


def verify_output(base: Any, out: Path, edits: dict[str, Edit], sign: float,
                  dora_norms: dict[str, Any] | None, norms: dict[str, Any]) -> dict[str, Any]:
    """Re-read the output and check every changed tensor against a float64 reference.

    The bound per element is half an ulp of the output dtype at the reference value plus the
    float32 arithmetic error of the merge, ``(r + 3)·2⁻²⁴ · (|W| + Σ|w·s|·|B|@|A|)``. Reports
    the worst tensor (largest error / bound); a ratio above 1 is an error.
    """
    import torch

    from . import ops
    from .checkpoint import open_checkpoint

    merged = open_checkpoint(out)
    worst: dict[str, Any] = {"name": None, "ratio": 0.0, "max_abs_error": 0.0}
    for name, e in edits.items():
        got = merged.load(name, dtype=torch.float64)
        W = base.load(e.source, dtype=torch.float64)
        bound_abs = W.abs()
        ref = W
        if e.full is not None:
            t, wt = e.full
            F = t.to(torch.float64)
            ref = F if F.shape != W.shape or wt == 1.0 else W + wt * (F - W)
            W = ref
            bound_abs = ref.abs()
        for m, wt in e.lora:
            d = ops.lora_delta(m.A.double(), m.B.double(), m.scale, m.layout) * wt
            ref = ref + sign * d
            bound_abs = bound_abs + abs(wt) * ops.lora_abs_delta(
                m.A.double(), m.B.double(), m.scale, m.layout)
        if e.dora is not None:
            m, wt = e.dora
            d = ops.lora_delta(m.A.double(), m.B.double(), m.scale, m.layout)
            if sign > 0:
                mg, _ = ops.dora_merge(W, d, m.magnitude.double(), m.layout)
                ref = mg if wt == 1.0 else W + wt * (mg - W)
            else:
                ref = ops.dora_unmerge(W, d, m.magnitude.double(),
                                       dora_norms[name].double(), m.layout)
            bound_abs = ref.abs() + W.abs() + ops.lora_abs_delta(
                m.A.double(), m.B.double(), m.scale, m.layout)
        for m, wt in e.bias:
            ref = ref + sign * wt * m.scale * m.bias.double()
            bound_abs = bound_abs + abs(wt * m.scale) * m.bias.double().abs()
        out_dtype = merged.load(name).dtype
        half_ulp = 2.0 ** -ops.mantissa_bits(out_dtype)
        tiny = torch.finfo(out_dtype).tiny
        # float32 error of an r-term dot product, the scale, the weight and the addition:
        # at most (r + 3)·u relative to the absolute-value sum (Higham's γ bound), u = 2⁻²⁴
        r = max([m.rank for m, _ in e.lora] + [e.dora[0].rank if e.dora else 1])
        bound = half_ulp * ref.abs() + (r + 3) * 2.0 ** -24 * bound_abs + tiny
        err = (got - ref).abs()
        ratio = float((err / bound).max()) if err.numel() else 0.0
        if ratio > worst["ratio"]:
            worst = {"name": name, "ratio": ratio, "max_abs_error": float(err.max())}
    worst["checked"] = len(edits)
    worst["ok"] = worst["ratio"] <= 1.0
    if not worst["ok"]:
        raise LoraToolError(f"--verify: {worst['name']} is off by {worst['max_abs_error']:.3g}, "
                            f"{worst['ratio']:.2f}× the rounding bound; the output is wrong "
                            "(please report this)")
    return worst
