"""``loratool extract``: a LoRA adapter from a fine-tuned model, with its error measured.

Streams over base and tuned tensor by tensor: ΔW = W_tuned − W_base in float32, factorised by
a randomized SVD (an exact one with ``exact_svd``) at the rank a policy chooses, the error of
the stored factors measured, not estimated. Unchanged tensors are skipped; embeddings and
lm_head are stored in full (``modules_to_save``) unless ``embed_lora``; changed norms are
stored in full (or dropped with ``skip_full``); bias changes of factorised modules become
``lora_B.bias``.

Example::

    report = extract("base/", "tuned/", Path("adapter"), RankPolicy.from_options(16, ...))
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from .errors import FormatError, LoraToolError
from .policy import Factored, RankPolicy, factorize, module_seed
from .progress import SILENT, Progress

# lookup tables (token, position, relative-position): a LoRA on them is PEFT's embedding
# LoRA, never a linear one; by default they are stored in full
EMBEDDING = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared|relative_attention_bias)\.weight$")
HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$")
CONV1D_TYPES = {"gpt2", "openai-gpt", "decision_transformer", "imagegpt"}
CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")


def _matches(name: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _kind(name: str, shape: tuple[int, ...], model_type: str | None, embed_lora: bool) -> str:
    """How a changed tensor is stored: linear / fan_in_fan_out / embedding / conv / full."""
    if HEAD.search(name) and len(shape) == 2:
        return "linear" if embed_lora else "full"
    if EMBEDDING.search(name) and len(shape) == 2:
        return "embedding" if embed_lora else "full"
    if not name.endswith(".weight"):
        return "full"
    if len(shape) == 2:
        if model_type in CONV1D_TYPES and CONV1D_NAMES.search(name):
            return "fan_in_fan_out"  # GPT-2's Conv1D stores [in, out]
        return "linear"
    if len(shape) in (3, 4, 5):
        return "conv"
    return "full"


def _matrix(delta: Any, kind: str) -> Any:
    """The matrix to factorise, oriented [out, in] as B [out, r] @ A [r, in] expects."""
    if kind in ("fan_in_fan_out", "embedding"):
        return delta.T
    if kind == "conv":
        return delta.reshape(delta.shape[0], -1)
    return delta


def _pairs(base: Any, tuned: Any, targets: list[str], excludes: list[str]
           ) -> list[str]:
    """Names to compare; a name in one model only is an error naming it (after filters)."""
    def keep(n: str) -> bool:
        return (not targets or _matches(n, targets)) and not _matches(n, excludes)

    def weight(ckpt: Any, n: str) -> bool:
        # integer buffers (BERT's position_ids, which newer transformers no longer saves) are
        # not weights: one model having them and the other not is no mismatch
        return ckpt.tensors[n].dtype.startswith(("F", "BF"))

    names = [n for n in base.tensors if keep(n) and (n in tuned.tensors or weight(base, n))]
    only_tuned = [n for n in tuned.tensors if keep(n) and n not in base.tensors
                  and weight(tuned, n)]
    only_base = [n for n in names if n not in tuned.tensors]
    if only_base or only_tuned:
        which = (f"{only_base[0]} is in the base but not the tuned model" if only_base else
                 f"{only_tuned[0]} is in the tuned model but not the base")
        raise FormatError(f"the models do not match: {which} ({len(only_base)} + "
                          f"{len(only_tuned)} such tensors); are they the same architecture? "
                          "--exclude GLOB leaves tensors out")
    if not names:
        raise LoraToolError("no tensors to compare (check --target/--exclude)")
    return names


def extract(base_spec: str, tuned_spec: str, out: Path, policy: RankPolicy, *,
            targets: list[str] | None = None, excludes: list[str] | None = None,
            device: str = "auto", fmt: str = "peft", exact_svd: bool = False,
            embed_lora: bool = False, skip_full: bool = False, seed: int = 0,
            dtype: str = "keep", force: bool = False, report_path: Path | None = None,
            progress: Progress = SILENT) -> dict[str, Any]:
    """Extract an adapter; returns the report (also what the model card summarises)."""
    import torch

    from .adapter import (LoraAdapter, LoraModule, add_head_mirror, input_embedding,
                          ties_embeddings)
    from .checkpoint import open_checkpoint, torch_dtype
    from .options import DTYPES, check_dtype, resolve_device

    t0 = time.perf_counter()
    if fmt not in ("peft", "kohya", "gguf"):
        raise LoraToolError(f"unknown --format {fmt}; use peft, kohya or gguf")
    check_dtype(dtype)
    dev = resolve_device(device)
    base, tuned = open_checkpoint(base_spec), open_checkpoint(tuned_spec)
    names = _pairs(base, tuned, list(targets or []), list(excludes or []))
    cfg = tuned.config or base.config or {}
    model_type = cfg.get("model_type")
    inputs = [p for p in (Path(base_spec), Path(tuned_spec)) if p.exists()]
    from .writer import check_output

    check_output(out, inputs, force)  # fail before the work, not after it
    if report_path is not None:
        check_output(report_path, inputs + [out], force)
        if not report_path.parent.is_dir():
            raise LoraToolError(f"--report {report_path}: folder {report_path.parent} does not "
                                "exist")

    # a head tied to the embeddings carries a copy of their change (see add_head_mirror)
    tied = ties_embeddings(cfg, base.tensors)
    embedding = input_embedding(base.tensors) if tied else None

    def store_dtype(code: str) -> Any:
        return torch_dtype(DTYPES[dtype] or code)

    # pass 1 (pass 2 too for --budget): read, diff, classify, factorise
    modules: list[dict[str, Any]] = []
    full: dict[str, Any] = {}
    dropped: list[str] = []
    biases: dict[str, Any] = {}
    skipped = 0
    budget_spectra: dict[str, Any] = {}

    bar = progress.bar("extract", total=len(names), unit="tensor")

    def deltas() -> Any:
        for name in names:
            bi, ti = base.info(name), tuned.info(name)
            bar.update(1)
            if bi.shape != ti.shape:
                if EMBEDDING.search(name) or HEAD.search(name):
                    yield name, None, tuned.load(name), ti  # resized vocabulary: store in full
                    continue
                raise FormatError(f"the models do not match: {name} is {list(bi.shape)} in the "
                                  f"base and {list(ti.shape)} in the tuned model")
            if not (ti.dtype.startswith(("F", "BF"))):
                continue  # integer buffers are not weights
            # compare in the stored dtype first: unchanged tensors (often the largest, the
            # embeddings) are skipped without float32 copies
            raw_base, raw_tuned = base.load(name), tuned.load(name)
            if raw_base.dtype == raw_tuned.dtype and torch.equal(raw_base, raw_tuned):
                yield name, None, None, ti
                continue
            w_base = raw_base.to(device=dev, dtype=torch.float32)
            del raw_base
            delta = raw_tuned.to(device=dev, dtype=torch.float32, copy=True).sub_(w_base)
            if delta.numel():
                lo, hi = (float(x) for x in torch.aminmax(delta))
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise FormatError(f"{name}: the difference holds NaN or Inf (a NaN or Inf in "
                                      "one of the models); nothing was written")
            yield name, w_base, delta, raw_tuned

    pending: list[tuple[str, str, Any, float, Any]] = []
    for name, w_base, delta, raw_tuned in deltas():
        ti = tuned.info(name)
        if w_base is None and delta is None:
            skipped += 1
            continue
        if w_base is None:
            full[name] = delta.to(store_dtype(ti.dtype))
            continue
        if not bool(delta.any()):
            skipped += 1
            continue
        kind = _kind(name, ti.shape, model_type, embed_lora)
        if kind == "full":
            if name.endswith(".bias"):
                biases[name] = delta.cpu()
            elif skip_full:
                dropped.append(name)
            else:
                full[name] = raw_tuned.to(store_dtype(ti.dtype)).cpu()  # the tuned values
            continue
        M = _matrix(delta, kind)
        rel_w = float(torch.linalg.vector_norm(delta, dtype=torch.float64) /
                      torch.linalg.vector_norm(w_base, dtype=torch.float64)) if bool(
            w_base.any()) else math.inf
        if policy.kind == "budget":
            # pass 1 of 2: only the spectrum, up to the cap; factors come in pass 2
            full_rank = min(M.shape)
            cap = policy.cap(full_rank) if policy.max_rank else min(full_rank, 256)
            from .policy import spectrum

            _, S, _, _ = spectrum(M, cap, exact_svd, module_seed(seed, name))
            mirrors = 2 if name == embedding else 1  # the tied head's copy costs as much
            budget_spectra[name] = (S[:cap].cpu(), sum(M.shape) * mirrors, cap)
            pending.append((name, kind, None, rel_w, ti))
            continue
        f = factorize(M, policy, exact=exact_svd, seed=module_seed(seed, name),
                      store_dtype=store_dtype(ti.dtype))
        modules.append(_module_entry(name, kind, f, rel_w, ti, delta))
        del M, delta, w_base
    bar.close()
    if policy.kind == "budget":
        from .ops import allocate_budget
        from .policy import parse_budget

        order = list(budget_spectra)
        if order and policy.budget_text and not policy.budget_text.strip().isdigit():
            # a size: count parameters at the bytes of the dtype they will be stored in
            nbytes = store_dtype(pending[0][4].dtype).itemsize
            policy = RankPolicy("budget", float(parse_budget(policy.budget_text, nbytes)),
                                policy.max_rank, policy.budget_text)
        # full tensors and bias deltas are stored whatever the ranks: they come off the top
        fixed = sum(t.numel() for t in full.values()) + (
            full[embedding].numel() if embedding in full else 0) + sum(
            d.numel() for b, d in biases.items() if b[: -len(".bias")] + ".weight" in
            budget_spectra)
        left = int(policy.value) - fixed
        if left < 0:
            raise LoraToolError(f"--budget {policy.budget_text} ({int(policy.value):,} "
                                f"parameters) is smaller than the {fixed:,} that full tensors and "
                                "bias changes need; --skip-full drops norms, --exclude leaves "
                                "tensors out")
        ranks = allocate_budget([budget_spectra[n][0] for n in order],
                                [budget_spectra[n][1] for n in order], left,
                                [budget_spectra[n][2] for n in order])
        if order and not any(ranks):
            cheapest = min(budget_spectra[n][1] for n in order)
            raise LoraToolError(f"--budget {policy.budget_text} leaves {left:,} parameters for "
                                f"LoRA factors, less than one rank-1 component needs "
                                f"({cheapest:,})")
        chosen = dict(zip(order, ranks))
        with progress.bar("extract at the budget's ranks", total=len(pending),
                          unit="tensor") as bar2:
            for name, kind, _, rel_w, ti in pending:  # pass 2: the same SVDs, chosen ranks
                bar2.update(1)
                w_base = base.load(name, device=dev, dtype=torch.float32)
                delta = tuned.load(name, device=dev, dtype=torch.float32).sub_(w_base)
                f = factorize(_matrix(delta, kind), policy, exact=exact_svd,
                              seed=module_seed(seed, name), store_dtype=store_dtype(ti.dtype),
                              rank=chosen[name])
                modules.append(_module_entry(name, kind, f, rel_w, ti, delta))
    from .formats.peft import task_type_for

    ad = LoraAdapter(base_model=base_spec, source_format="extract",
                     task_type=task_type_for(cfg.get("architectures")),
                     tie_embeddings=tied)
    for m in modules:
        if m["rank"] == 0:
            continue
        f: Factored = m.pop("_factors")
        A, B = f.A, f.B
        if m["layout"] == "conv":
            shape = m.pop("_shape")
            A = A.reshape(f.rank, *shape[1:])
            B = B.reshape(shape[0], f.rank, *[1] * (len(shape) - 2))
        else:
            m.pop("_shape")
        mod = m["name"]
        ad.add(LoraModule(mod, A.cpu(), B.cpu(), float(f.rank), False, m["layout"]))
    for m in modules:
        m.pop("_factors", None)
        m.pop("_shape", None)
    kept_bias = []
    # PEFT's lora_bias is one flag for the whole adapter and refuses embedding modules: with
    # embedding LoRA, bias changes are stored as the tuned biases in full instead
    lora_bias = not any(m.layout == "embedding" for m in ad.modules.values())
    for bname, d in biases.items():
        mod = bname[: -len(".bias")]
        if mod in ad.modules and lora_bias:
            ad.modules[mod].bias = d.to(ad.modules[mod].A.dtype)  # scale 1: b' = b + Δb
            kept_bias.append(bname)
        elif skip_full:
            dropped.append(bname)
        else:
            full[bname] = tuned.load(bname).to(store_dtype(tuned.info(bname).dtype))
    ad.full = full
    if ad.tie_embeddings and embedding is not None:
        add_head_mirror(ad, embedding)
    report = _report(base_spec, tuned_spec, out, fmt, policy, seed, exact_svd, modules, full,
                     dropped, kept_bias, skipped, ad, time.perf_counter() - t0, dev)
    _write(ad, out, fmt, report, base, force, inputs)
    report["seconds"] = time.perf_counter() - t0
    if report_path is not None:  # beside the adapter, written whole or not at all
        tmp = report_path.with_name(f".{report_path.name}.partial")
        tmp.write_text(report_json(report) + "\n")
        tmp.replace(report_path)
    return report


def _module_entry(name: str, kind: str, f: Factored, rel_w: float, ti: Any, delta: Any
                  ) -> dict[str, Any]:
    return {"name": name[: -len(".weight")], "tensor": name, "layout": kind, "rank": f.rank,
            "rel_error": f.rel_error, "kept_energy": f.kept_energy, "delta_norm": f.norm,
            "rel_delta": rel_w, "shape": list(ti.shape), "svd": f.svd, "_factors": f,
            "_shape": tuple(delta.shape)}


def _report(base: str, tuned: str, out: Path, fmt: str, policy: RankPolicy, seed: int,
            exact: bool, modules: list[dict[str, Any]], full: dict[str, Any],
            dropped: list[str], kept_bias: list[str], skipped: int, ad: Any,
            seconds: float, dev: Any) -> dict[str, Any]:
    tot_sq = sum(m["delta_norm"] ** 2 for m in modules)
    err_sq = sum((m["rel_error"] * m["delta_norm"]) ** 2 for m in modules)
    params = ad.num_params()
    nbytes = sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size()
                 for m in ad.modules.values()) + sum(t.numel() * t.element_size()
                                                     for t in ad.full.values())
    return {
        "base": base, "tuned": tuned, "output": str(out), "format": fmt,
        "policy": policy.describe(), "seed": seed, "svd": "exact" if exact else "randomized",
        "device": str(dev),
        "modules": modules,
        "full_tensors": sorted(full), "dropped": dropped, "bias_deltas": kept_bias,
        "unchanged_tensors": skipped,
        "totals": {"lora_modules": len(ad.modules), "parameters": params, "bytes": nbytes,
                   "max_rel_error": max((m["rel_error"] for m in modules), default=0.0),
                   "total_rel_error": math.sqrt(err_sq / tot_sq) if tot_sq else 0.0,
                   "ranks": sorted({m["rank"] for m in modules})},
        "seconds": seconds,
    }


def card_note(report: dict[str, Any]) -> str:
    """The model card's account of how the adapter was made and what it loses."""
    t = report["totals"]
    lines = [f"Extracted by loratool from `{report['tuned']}` against `{report['base']}` with "
             f"a truncated {report['svd']} SVD of each weight difference.", "",
             f"- rank policy: {report['policy']}; seed {report['seed']}",
             f"- relative Frobenius error ‖ΔW − BA‖/‖ΔW‖, measured on the stored factors: max "
             f"{t['max_rel_error']:.4g}, over all modules {t['total_rel_error']:.4g}",
             f"- {t['lora_modules']} LoRA modules (ranks {', '.join(map(str, t['ranks']))}), "
             f"{len(report['full_tensors'])} full tensors, {t['parameters']:,} parameters"]
    if report["dropped"]:
        lines.append(f"- dropped (--skip-full): {', '.join(report['dropped'][:8])}")
    return "\n".join(lines)


def _write(ad: Any, out: Path, fmt: str, report: dict[str, Any], base: Any, force: bool,
           inputs: list[Path]) -> None:
    from .formats import gguf, kohya, lossy, peft

    if not ad.modules:
        raise LoraToolError("nothing to extract: no weight differs between the two models "
                            "(or --target/--exclude left none)")
    if fmt == "peft":
        peft.write(ad, out, force=force, inputs=inputs, note=card_note(report))
        return
    lost = lossy(ad, fmt)
    if lost:
        raise FormatError(f"--format {fmt} cannot hold {'; '.join(lost)}; use --format peft, "
                          "or --skip-full and no --embed-lora")
    if fmt == "kohya":
        kohya.write(ad, out, force=force, inputs=inputs)
    else:
        if base.config is None:
            raise FormatError("--format gguf needs the base's config.json")
        gguf.write(ad, out, base.config, force=force, inputs=inputs)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False, default=str)
