"""``loratool analyze``: the LoRA paper's §7 on your own models.

Three inputs, three questions:

- a base and a fine-tune: how low-rank is what the fine-tune changed? Per changed matrix the
  leading singular values of ΔW (a randomized SVD, streamed as ``extract`` streams), the exact
  ‖ΔW‖²_F (so the tail's mass is known without a full SVD), the rank that keeps 50/90/99 % of
  it, the Eckart–Young error of every rank, and the amplification factor ‖ΔW‖/‖UᵀWV‖ beside
  the same for random directions;


- an adapter (``--base`` for the amplification): the same, from the factors (QR of the
  factors and an SVD of the small core, never a dense matrix);


- two adapters (``compare``): the subspace similarity φ(i, j) of their A factors per module.

Example::
    report = analyze(["base/", "tuned/"])
    report["modules"][0]["effective_rank"]["0.9"]
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..engine import deltas
from ..engine.plan import changes_nothing
from ..errors import LoraToolError, UsageError
from ..formats import read_any, require_lora, require_resolved
from ..headers import moe
from ..io.tensors import open_checkpoint
from ..model.adapter import match_base
from ..model.experts import explode
from ..numerics import ops
from ..numerics.device import resolve_device
from ..numerics.lowrank import module_seed, spectrum
from ..progress import SILENT, Progress
from ..units import matches

ENERGIES = (0.5, 0.9, 0.99)
FIRST = 32  # singular values computed first per module
# Three power iterations (extract uses two). Measured on a real fine-tune of MiniLM, whose
# spectrum has a flat tail: the first 16 of 32 singular values within 0.06 % of a dense SVD's,
# the 32nd within 2 % (low, so ranks read from it err on the safe side), the effective ranks
# equal; at the cost of extract itself (docs/benchmarks.md)
POWER_ITERS = 3
MAX_RANK = 256  # grown up to this when an energy needs more
GRID = 64  # φ is given for i, j up to this


def analyze(paths: list[str], *, base: str | None = None, compare: bool = False,
            subspace: str = "a",
            energies: tuple[float, ...] = ENERGIES, rank: int | None = None,
            max_rank: int = MAX_RANK, targets: list[str] | None = None,
            excludes: list[str] | None = None, device: str = "auto", exact_svd: bool = False,
            seed: int = 0, progress: Progress = SILENT) -> dict[str, Any]:
    """Analyse a fine-tune (two paths), an adapter (one) or two adapters (``compare``);
    returns the report."""

    t0 = time.perf_counter()
    energies = tuple(sorted(set(energies)))
    if not energies or not all(0.0 < e <= 1.0 for e in energies):
        raise UsageError("--energy values must be fractions in (0, 1], e.g. 0.9")
    if compare and len(paths) != 2:
        raise UsageError("--compare takes two adapters")
    if len(paths) not in (1, 2):
        raise UsageError("give BASE TUNED (a fine-tune), ADAPTER, or --compare ADAPTER ADAPTER")
    opts = {"energies": energies, "rank": rank, "max_rank": max_rank, "exact": exact_svd,
            "seed": seed, "dev": resolve_device(device)}
    if compare:
        report = _compare(paths[0], paths[1], base, subspace, progress)
    elif len(paths) == 2:
        report = _finetune(paths[0], paths[1], list(targets or []), list(excludes or []),
                           opts, progress)
    else:
        report = _adapter(paths[0], base, opts, progress)
    if report["mode"] != "finetune" and (targets or excludes):  # modules by name
        keep = [m for m in report["modules"] if matches(m["name"], targets)
                and not (excludes and matches(m["name"], excludes))]
        if not keep:
            raise LoraToolError("--target/--exclude leave no module to analyse")
        report["modules"] = keep
    report.update(energies=list(energies), seconds=time.perf_counter() - t0)
    if report["mode"] == "finetune":
        report["suggest"] = _suggest(report, paths)
    return report


# --------------------------------------------------------------------------- a fine-tune

def _finetune(base_spec: str, tuned_spec: str, targets: list[str], excludes: list[str],
              opts: dict[str, Any], progress: Progress) -> dict[str, Any]:

    base = open_checkpoint(base_spec, progress)
    tuned = open_checkpoint(tuned_spec, progress)
    names = deltas.pairs(base, tuned, targets, excludes)
    model_type = (tuned.config or base.config or {}).get("model_type")
    modules, other = [], []
    with progress.bar("analyze", total=len(names), unit="tensor") as bar:
        for name, W, dW, _ in deltas.diffs(base, tuned, names, opts["dev"], bar):
            if W is None or not bool(dW.any()):
                continue  # unchanged, or resized (nothing to compare it with)
            layout = deltas.kind(name, tuple(dW.shape), model_type, embed_lora=True)
            if layout == "full":  # norms and biases: not matrices
                other.append(name)
                continue
            M, Wm = deltas.matrix(dW, layout), deltas.matrix(W, layout)
            entry = {"name": name[: -len(".weight")], "tensor": name, "layout": layout,
                     "shape": list(dW.shape), "rel_delta": _ratio(M, Wm),
                     # extract stores embeddings and heads in full unless --embed-lora
                     "needs_embed_lora": deltas.kind(name, tuple(dW.shape), model_type,
                                                     embed_lora=False) == "full"}
            entry.update(_measure(M, Wm, opts, module_seed(opts["seed"], name)))
            modules.append(entry)
    if not modules:
        raise LoraToolError("no weight matrix differs between the two models (or "
                            "--target/--exclude left none): nothing to analyse")

    # extract factorises each expert's gate and up rows together: other ranks than here
    fused = model_type in moe.FUSING_TYPES and any(
        moe.PER_EXPERT.match(m["tensor"]) for m in modules)
    return {"mode": "finetune", "base": base_spec, "tuned": tuned_spec, "modules": modules,
            "other_changed": other, "fused_experts": fused}


def _ratio(M: Any, W: Any) -> float | None:
    w = ops.sum_squares(W)
    return math.sqrt(ops.sum_squares(M) / w) if w else None


def _measure(M: Any, W: Any, opts: dict[str, Any], seed: int) -> dict[str, Any]:
    """Spectrum, effective ranks, error curve and amplification of one ΔW (as a matrix)."""

    total_sq = ops.sum_squares(M)
    cap = min(min(M.shape), opts["max_rank"])
    U, S, Vh, how = spectrum(M, min(FIRST, cap), opts["exact"], seed, POWER_ITERS)
    while (ops.rank_for_energy(S, total_sq, max(opts["energies"]) - 1e-12) is None
           and len(S) < cap and how != "exact"):  # an energy is not reached yet: grow
        U, S, Vh, how = spectrum(M, min(2 * len(S), cap), opts["exact"], seed, POWER_ITERS)
    S, U, Vh = S[:cap], U[:, :cap], Vh[:cap]
    out = ops.spectrum_measures(S.cpu(), total_sq, opts["energies"], shown=cap)
    out.update(delta_norm=math.sqrt(total_sq), svd=how, full_rank=min(M.shape))
    out["amplification"] = _amplification(math.sqrt(total_sq), W, U, Vh, out, opts, seed)
    return out


def _amplification(norm: float, W: Any, U: Any, Vh: Any, measures: dict[str, Any],
                   opts: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """‖ΔW‖/‖UᵀWV‖ for ΔW's top-r directions, and for r random ones (the paper's §7.3)."""

    if W is None or not len(Vh):
        return None
    middle = opts["energies"][len(opts["energies"]) // 2]
    r = opts["rank"] or measures["effective_rank"][f"{middle:g}"] or len(Vh)
    r = max(1, min(r, len(Vh)))
    g = torch.Generator(device=W.device).manual_seed(seed + 1)
    Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, device=W.device)).Q
    Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, device=W.device)).Q
    return {"rank": r, "factor": ops.amplification(norm, W.float(), U[:, :r], Vh[:r]),
            "random": ops.amplification(norm, W.float(), Ur, Vr.T)}


# --------------------------------------------------------------------------- an adapter

def _adapter(spec: str, base_spec: str | None, opts: dict[str, Any], progress: Progress
             ) -> dict[str, Any]:
    """Each module's ΔW = s·B·A, analysed from its factors (exact: rank r at most)."""

    ad = read_any(spec, base_spec)
    require_resolved(ad, spec)
    require_lora(ad, spec, "analyze works on LoRA factors")
    base = open_checkpoint(base_spec, progress) if base_spec else None
    where = match_base(ad, base) if base is not None and ad.components in ([None],) else {}
    ad, _ = explode(ad)  # each expert of a fused parameter on its own (no W: no amplification)
    modules = []
    with progress.bar("analyze", total=len(ad.modules), unit="module") as bar:
        for key, m in ad.modules.items():
            bar.update(1)
            B, A = m.factors_2d(torch.float32)
            U, S, Vh = ops.factored_svd(B, A * m.scale)
            total_sq = float((S ** 2).sum())
            entry = {"name": key, "layout": m.layout, "rank": m.rank, "scale": m.scale}
            entry.update(ops.spectrum_measures(S.float(), total_sq, opts["energies"],
                                               shown=len(S)))
            entry.update(delta_norm=math.sqrt(total_sq), svd="exact")
            W = None
            if key in where:
                W = deltas.matrix(base.load(where[key], device=opts["dev"],  # type: ignore
                                            dtype=torch.float32), m.layout)
                w_sq = ops.sum_squares(W)
                entry["rel_delta"] = math.sqrt(total_sq / w_sq) if w_sq else None
            entry["amplification"] = _amplification(
                math.sqrt(total_sq), W, U.to(opts["dev"]), Vh.to(opts["dev"]),
                {**entry, "effective_rank": {}}, {**opts, "rank": opts["rank"] or m.rank}, 0)
            modules.append(entry)
    return {"mode": "adapter", "adapter": spec, "base": base_spec, "modules": modules}


# --------------------------------------------------------------------------- two adapters

def _compare(a: str, b: str, base: str | None, subspace: str, progress: Progress
             ) -> dict[str, Any]:
    """φ(i, j) per module the two adapters share (the paper's §7.2), of the A factors'
    right-singular vectors (``subspace="a"``, the paper's) or of ΔW's (``"delta"``)."""

    ads = [read_any(a, base), read_any(b, base)]
    for ad, spec in zip(ads, (a, b)):
        require_resolved(ad, spec)
        require_lora(ad, spec, "analyze works on LoRA factors")
    ads = [explode(ad)[0] for ad in ads]  # each expert on its own

    shared = [k for k in ads[0].modules if k in ads[1].modules]
    # a module whose B@A is zero in either adapter changes nothing there: φ would describe
    # directions that carry no change, so it is named instead of measured
    inert = [k for k in shared if any(changes_nothing(ad.modules[k]) for ad in ads)]
    common = [k for k in shared if k not in inert]
    if not common:
        raise LoraToolError(f"{a} and {b} share no module that changes something in both: "
                            "nothing to compare")
    modules = []
    with progress.bar("compare", total=len(common), unit="module") as bar:
        for key in common:
            bar.update(1)
            m1, m2 = ads[0].modules[key], ads[1].modules[key]
            V = [_directions(m, subspace)[:GRID] for m in (m1, m2)]
            if V[0].shape[1] != V[1].shape[1]:
                raise LoraToolError(f"{key}: the adapters' inputs differ ({V[0].shape[1]} and "
                                    f"{V[1].shape[1]}): are they for the same base?")
            phi = ops.subspace_similarity(V[0], V[1])
            k = min(phi.shape)
            modules.append({"name": key, "ranks": [m1.rank, m2.rank],
                            "phi": [[float(x) for x in row] for row in phi],
                            "phi_diagonal": [float(phi[i, i]) for i in range(k)],
                            "phi_min_rank": float(phi[k - 1, k - 1])})
    return {"mode": "compare", "adapters": [a, b], "subspace": subspace, "modules": modules,
            "changes_nothing": inert,
            "only_in_first": [k for k in ads[0].modules if k not in ads[1].modules],
            "only_in_second": [k for k in ads[1].modules if k not in ads[0].modules]}


def _directions(m: Any, subspace: str) -> Any:
    """Orthonormal input directions of a module, strongest first: A's right-singular vectors
    (which depend on how B·A is split: A and 2·A, or A and B's rotation of it, differ), or
    ΔW = s·B·A's (which do not)."""

    B, A = m.factors_2d(torch.float64)
    if subspace == "a":
        return torch.linalg.svd(A, full_matrices=False).Vh
    return ops.factored_svd(B, A * m.scale)[2]


# --------------------------------------------------------------------------- advice

def _suggest(report: dict[str, Any], paths: list[str]) -> dict[str, Any] | None:
    """From "what rank do I need" to "extract at that rank": the extract command that keeps
    the middle energy in every module, with the ranks and parameters it gives."""
    energies = report["energies"]
    e = energies[len(energies) // 2]
    ranks = [m["effective_rank"][f"{e:g}"] for m in report["modules"]]
    if any(r is None for r in ranks):
        return None
    params = None if report["fused_experts"] else sum(
        r * (m["shape"][0] + math.prod(m["shape"][1:])) for r, m in zip(ranks, report["modules"]))
    flag = " --embed-lora" if any(m["needs_embed_lora"] for m in report["modules"]) else ""
    return {"energy": e, "ranks": [min(ranks), max(ranks)], "parameters": params,
            "command": f"loratool extract {paths[0]} {paths[1]} -o ADAPTER --energy {e:g}"
                       + flag}
