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
    report.modules[0].effective_rank["0.9"]
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..engine import deltas
from ..engine.plan import changes_nothing
from ..errors import LoraToolError, UsageError
from ..formats import read_any, require_lora, require_resolved
from ..headers import changes, moe
from ..io.tensors import open_checkpoint
from ..model.adapter import LoraModule, match_base
from ..model.experts import explode
from ..numerics import ops
from ..numerics.device import resolve_device
from ..numerics.lowrank import module_seed, spectrum
from ..progress import SILENT, Progress
from ..reports.analyze import (
    AdapterAnalysis,
    AdapterModule,
    Amplification,
    CompareAnalysis,
    CompareModule,
    FinetuneAnalysis,
    FinetuneModule,
    Suggestion,
)
from ..units import matches

PathLike = str | os.PathLike[str]

ENERGIES = (0.5, 0.9, 0.99)
FIRST = 32  # singular values computed first per module
# Three power iterations (extract uses two). Measured on a real fine-tune of MiniLM, whose
# spectrum has a flat tail: the first 16 of 32 singular values within 0.06 % of a dense SVD's,
# the 32nd within 2 % (low, so ranks read from it err on the safe side), the effective ranks
# equal; at the cost of extract itself (docs/benchmarks.md)
POWER_ITERS = 3
MAX_RANK = 256  # grown up to this when an energy needs more
GRID = 64  # φ is given for i, j up to this


@dataclass(frozen=True)
class _Settings:
    """What every module is measured with."""

    energies: tuple[float, ...]  # sorted
    rank: int | None  # of the amplification (None: each module's own)
    max_rank: int
    exact: bool
    seed: int
    device: torch.device

    @property
    def middle(self) -> float:
        """The energy the amplification's rank and the suggested extract keep."""
        return self.energies[len(self.energies) // 2]


def analyze(paths: list[PathLike], *, base: PathLike | None = None, compare: bool = False,
            subspace: str = "a", energies: tuple[float, ...] = ENERGIES,
            rank: int | None = None, max_rank: int = MAX_RANK,
            targets: list[str] | None = None, excludes: list[str] | None = None,
            device: str = "auto", exact_svd: bool = False, seed: int = 0,
            progress: Progress = SILENT
            ) -> FinetuneAnalysis | AdapterAnalysis | CompareAnalysis:
    """Analyse a fine-tune (``paths`` = base, tuned), an adapter (one path; ``base`` gives the
    amplification its W) or two adapters (``compare``: φ of their ``subspace``, ``"a"`` or
    ``"delta"``). ``energies``: the shares of ‖ΔW‖² effective ranks are given for; ``rank``:
    the amplification's (default each module's rank at the middle energy, or an adapter's
    own). Raises :class:`loratool.LoraToolError` on inputs it cannot analyse.

    Example::

        r = loratool.analyze(["base/", "tuned/"])
        r.modules[0].effective_rank["0.9"], r.suggest and r.suggest.command
        loratool.analyze(["r8/", "r64/"], compare=True).modules[0].phi_min_rank
    """
    t0 = time.perf_counter()
    energies = tuple(sorted(set(energies)))
    if not energies or not all(0.0 < e <= 1.0 for e in energies):
        raise UsageError("--energy values must be fractions in (0, 1], e.g. 0.9")
    if compare and len(paths) != 2:
        raise UsageError("--compare takes two adapters")
    if len(paths) not in (1, 2):
        raise UsageError("give BASE TUNED (a fine-tune), ADAPTER, or --compare ADAPTER ADAPTER")
    specs = [os.fspath(p) for p in paths]
    base_spec = os.fspath(base) if base is not None else None
    settings = _Settings(energies, rank, max_rank, exact_svd, seed, resolve_device(device))
    report: FinetuneAnalysis | AdapterAnalysis | CompareAnalysis
    if compare:
        report = _compare(specs[0], specs[1], base_spec, subspace, settings, progress)
        report.modules = _named(report.modules, targets, excludes)
    elif len(specs) == 2:
        report = _finetune(specs[0], specs[1], list(targets or []), list(excludes or []),
                           settings, progress)
    else:
        report = _adapter(specs[0], base_spec, settings, progress)
        report.modules = _named(report.modules, targets, excludes)
    report.seconds = time.perf_counter() - t0
    return report


Named = TypeVar("Named", AdapterModule, CompareModule)


def _named(modules: list[Named], targets: list[str] | None, excludes: list[str] | None
           ) -> list[Named]:
    """An adapter's modules chosen by name (a fine-tune's are chosen as its tensors are read)."""
    if not (targets or excludes):
        return modules
    keep = [m for m in modules if matches(m.name, targets)
            and not (excludes and matches(m.name, excludes))]
    if not keep:
        raise LoraToolError("--target/--exclude leave no module to analyse")
    return keep


# --------------------------------------------------------------------------- a fine-tune

def _finetune(base_spec: str, tuned_spec: str, targets: list[str], excludes: list[str],
              settings: _Settings, progress: Progress) -> FinetuneAnalysis:

    base = open_checkpoint(base_spec, progress)
    tuned = open_checkpoint(tuned_spec, progress)
    names = changes.pairs(base, tuned, targets, excludes)
    model_type = (tuned.config or base.config or {}).get("model_type")
    modules: list[FinetuneModule] = []
    other: list[str] = []
    with progress.bar("analyze", total=len(names), unit="tensor") as bar:
        for name, W, dW, _ in deltas.diffs(base, tuned, names, settings.device, bar):
            if W is None or not bool(dW.any()):
                continue  # unchanged, or resized (nothing to compare it with)
            layout = changes.kind(name, tuple(dW.shape), model_type, embed_lora=True)
            if layout == "full":  # norms and biases: not matrices
                other.append(name)
                continue
            modules.append(_finetune_module(name, layout, W, dW, model_type, settings))
    if not modules:
        raise LoraToolError("no weight matrix differs between the two models (or "
                            "--target/--exclude left none): nothing to analyse")

    # extract factorises each expert's gate and up rows together: other ranks than here
    fused = model_type in moe.FUSING_TYPES and any(
        moe.PER_EXPERT.match(m.tensor) for m in modules)
    return FinetuneAnalysis(
        mode="finetune", base=base_spec, tuned=tuned_spec, modules=modules,
        other_changed=other, fused_experts=fused, energies=list(settings.energies),
        seconds=0.0, suggest=_suggest(modules, settings.middle, fused, base_spec, tuned_spec))


def _finetune_module(name: str, layout: str, W: torch.Tensor, dW: torch.Tensor,
                     model_type: str | None, settings: _Settings) -> FinetuneModule:
    """Spectrum, effective ranks, error curve and amplification of one ΔW (as a matrix)."""

    M, Wm = deltas.matrix(dW, layout), deltas.matrix(W, layout)
    w_sq, total_sq = ops.sum_squares(Wm), ops.sum_squares(M)
    seed = module_seed(settings.seed, name)
    cap = min(min(M.shape), settings.max_rank)
    U, S, Vh, how = spectrum(M, min(FIRST, cap), settings.exact, seed, POWER_ITERS)
    while (ops.rank_for_energy(S, total_sq, max(settings.energies) - 1e-12) is None
           and len(S) < cap and how != "exact"):  # an energy is not reached yet: grow
        U, S, Vh, how = spectrum(M, min(2 * len(S), cap), settings.exact, seed, POWER_ITERS)
    S, U, Vh = S[:cap], U[:, :cap], Vh[:cap]
    sm = ops.spectrum_measures(S.cpu(), total_sq, settings.energies, shown=cap)
    chosen = settings.rank or sm.effective_rank[f"{settings.middle:g}"]
    return FinetuneModule(
        name=name[: -len(".weight")], tensor=name, layout=layout, shape=list(dW.shape),
        rel_delta=math.sqrt(total_sq / w_sq) if w_sq else None,
        # extract stores embeddings and heads in full unless --embed-lora
        needs_embed_lora=changes.kind(name, tuple(dW.shape), model_type,
                                     embed_lora=False) == "full",
        singular_values=sm.singular_values, computed=sm.computed,
        captured_energy=sm.captured_energy, effective_rank=sm.effective_rank,
        error_curve=sm.error_curve, delta_norm=math.sqrt(total_sq), svd=how,
        full_rank=min(M.shape),
        amplification=_amplification(math.sqrt(total_sq), Wm, U, Vh, chosen, seed))


def _amplification(norm: float, W: torch.Tensor | None, U: torch.Tensor, Vh: torch.Tensor,
                   rank: int | None, seed: int) -> Amplification | None:
    """‖ΔW‖/‖UᵀWV‖ for ΔW's top-``rank`` directions (all of them where None), and for as many
    random ones (the paper's §7.3)."""

    if W is None or not len(Vh):
        return None
    r = max(1, min(rank or len(Vh), len(Vh)))
    g = torch.Generator(device=W.device).manual_seed(seed + 1)
    Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, device=W.device)).Q
    Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, device=W.device)).Q
    return Amplification(rank=r, factor=ops.amplification(norm, W.float(), U[:, :r], Vh[:r]),
                         random=ops.amplification(norm, W.float(), Ur, Vr.T))


# --------------------------------------------------------------------------- an adapter

def _adapter(spec: str, base_spec: str | None, settings: _Settings, progress: Progress
             ) -> AdapterAnalysis:
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
            sm = ops.spectrum_measures(S.float(), total_sq, settings.energies, shown=len(S))
            W, rel = None, None
            if base is not None and key in where:
                W = deltas.matrix(base.load(where[key], device=settings.device,
                                            dtype=torch.float32), m.layout)
                w_sq = ops.sum_squares(W)
                rel = math.sqrt(total_sq / w_sq) if w_sq else math.nan  # null in JSON
            modules.append(AdapterModule(
                name=key, layout=m.layout, rank=m.rank, scale=m.scale,
                singular_values=sm.singular_values, computed=sm.computed,
                captured_energy=sm.captured_energy, effective_rank=sm.effective_rank,
                error_curve=sm.error_curve, delta_norm=math.sqrt(total_sq), svd="exact",
                rel_delta=rel,
                amplification=_amplification(math.sqrt(total_sq), W, U.to(settings.device),
                                             Vh.to(settings.device),
                                             settings.rank or m.rank, 0)))
    return AdapterAnalysis(mode="adapter", adapter=spec, base=base_spec, modules=modules,
                           energies=list(settings.energies), seconds=0.0)


# --------------------------------------------------------------------------- two adapters

def _compare(a: str, b: str, base: str | None, subspace: str, settings: _Settings,
             progress: Progress) -> CompareAnalysis:
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
            modules.append(CompareModule(
                name=key, ranks=[m1.rank, m2.rank],
                phi=[[float(x) for x in row] for row in phi],
                phi_diagonal=[float(phi[i, i]) for i in range(k)],
                phi_min_rank=float(phi[k - 1, k - 1])))
    return CompareAnalysis(
        mode="compare", adapters=[a, b], subspace=subspace, modules=modules,
        changes_nothing=inert,
        only_in_first=[k for k in ads[0].modules if k not in ads[1].modules],
        only_in_second=[k for k in ads[1].modules if k not in ads[0].modules],
        energies=list(settings.energies), seconds=0.0)


def _directions(m: LoraModule, subspace: str) -> torch.Tensor:
    """Orthonormal input directions of a module, strongest first: A's right-singular vectors
    (which depend on how B·A is split: A and 2·A, or A and B's rotation of it, differ), or
    ΔW = s·B·A's (which do not)."""

    B, A = m.factors_2d(torch.float64)
    if subspace == "a":
        return torch.linalg.svd(A, full_matrices=False).Vh
    return ops.factored_svd(B, A * m.scale)[2]


# --------------------------------------------------------------------------- advice

def _suggest(modules: list[FinetuneModule], energy: float, fused: bool, base: str, tuned: str
             ) -> Suggestion | None:
    """From "what rank do I need" to "extract at that rank": the extract command that keeps
    the middle energy in every module, with the ranks and parameters it gives."""
    found = [m.effective_rank[f"{energy:g}"] for m in modules]
    ranks = [r for r in found if r is not None]
    if len(ranks) < len(found):
        return None
    params = None if fused else sum(
        r * (m.shape[0] + math.prod(m.shape[1:])) for r, m in zip(ranks, modules))
    flag = " --embed-lora" if any(m.needs_embed_lora for m in modules) else ""
    return Suggestion(energy=energy, ranks=[min(ranks), max(ranks)], parameters=params,
                      command=f"loratool extract {base} {tuned} -o ADAPTER --energy {energy:g}"
                              + flag)
