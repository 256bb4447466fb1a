"""``loratool convert``: any adapter format to any other, lossless or refused.

Reads with the format readers into the one ``LoraAdapter`` model and writes with the target's
writer. What the target cannot hold is named and refused, unless ``drop`` says to drop it.

Example::

    import loratool
    report = loratool.convert("adapter/", "lora.safetensors", "kohya")
    print(report.render())
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import FormatError
from ..formats import (
    FORMATS,
    drop_base_copies,
    drop_unsupported,
    lossy,
    lyco_message,
    output_format,
    read_any,
    require_resolved,
    write_adapter,
)
from ..headers.checkpoint import Checkpoint
from ..headers.paths import is_pipeline
from ..headers.peft_tuners import TUNER_NAMES
from ..io.tensors import open_checkpoint, torch_dtype
from ..model.adapter import (
    LoraAdapter,
    LoraModule,
    OtherModule,
    component_folder,
    lyco_tensor,
    match_base,
    only_component,
    pipeline_folders,
)
from ..model.tuners import TunerModule
from ..numerics.lowrank import (
    BudgetItem,
    allocate,
    factorize,
    module_seed,
    spectrum,
    spectrum_cap,
)
from ..options import DTYPES, Fixed, Options, RankPolicy
from ..progress import SILENT, Progress
from ..reports.convert import ConvertReport, GgufInfo, LycorisModule, LycorisPart

PathLike = str | os.PathLike[str]


def _local(spec: str | None) -> list[Path]:
    return [Path(spec)] if spec and Path(spec).exists() else []


def convert(adapter: PathLike, out: PathLike, to: str, *, base: str | None = None,
            drop: bool = False, policy: RankPolicy | None = None, dtype: str = "keep",
            force: bool = False, options: Options | None = None,
            progress: Progress = SILENT) -> ConvertReport:
    """Convert ``adapter`` (a path or Hub id, its format detected) to format ``to`` (peft,
    kohya, diffusers or gguf) in ``out``. ``base``: the base model, which resolves kohya names,
    gives GGUF its architecture and checks that the adapter fits. ``drop``: leave out what
    ``to`` cannot hold (named in the report) instead of refusing. LyCORIS LoHa, LoKr and full
    modules become LoRA at the rank ``policy`` (required for them, and only for them), their
    factors in ``dtype`` (keep: theirs).

    Example::

        r = loratool.convert("adapter/", "adapter.gguf", "gguf", base="org/Llama-3.2-1B")
        r.modules, r.gguf.alpha if r.gguf else None
    """
    spec, out = os.fspath(adapter), Path(out)
    to = output_format(out, to, to, FORMATS)  # refuses -o x.safetensors for PEFT and the like
    ad = read_any(spec, base)
    _check_policy(ad, spec, to, policy)
    if to != "kohya" or ad.lyco:
        require_resolved(ad, spec)
    base_ckpt = None
    same: list[str] = []
    if base and not is_pipeline(base):  # a pipeline is checked per component below
        base_ckpt = open_checkpoint(base)
        same = drop_base_copies(ad, base_ckpt)
    lycoris = None
    if ad.lyco:
        assert policy is not None  # _check_policy refused LyCORIS without one
        _fit_lyco(ad, base, spec)  # a conv stored flat takes its kernel from the base
        converted = lyco_to_lora(ad, policy, dtype, progress=progress)
        lycoris = LycorisPart(policy.describe(), converted,
                              max(e.rel_error for e in converted))
    lost = lossy(ad, to)
    if lost and not drop:
        raise FormatError(f"converting to {to} would lose {'; '.join(lost)}; pass "
                          "--drop-unsupported to write the rest without them")
    if lost:
        ad = drop_unsupported(ad, to)
    empty = sorted(k for k, m in ad.modules.items() if m.rank == 0)
    if empty:  # they change nothing, and no format stores a rank of 0
        ad.modules = {k: m for k, m in ad.modules.items() if m.rank}
    if not ad.modules:
        raise FormatError(f"{spec}: no LoRA modules left to write" + (
            " (every module has rank 0: the adapter changes nothing)" if empty else ""))
    if base_ckpt is not None and to != "kohya" and ad.components in ([None],):
        match_base(ad, base_ckpt)  # the adapter must fit the base it is for
    if base and is_pipeline(base):
        _fits_pipeline(ad, Path(base), spec)
    report = ConvertReport(input=spec, source_format=ad.source_format, format=to,
                           modules=len(ad.modules), full_tensors=len(ad.full), dropped=lost,
                           base_copies_left_out=same, rank_0_left_out=empty, lycoris=lycoris)
    note = f"Converted by loratool from a {ad.source_format} adapter."
    # options reach the writer's stage once write_adapter takes them
    report.output, info = write_adapter(ad, out, to, base=base, force=force,
                                        inputs=_local(spec) + _local(base), note=note,
                                        with_info=True, options=options)
    drops = info.pop("diffusers_drops", None) if info else None
    report.diffusers_drops = list(drops) if isinstance(drops, list) else None
    report.gguf = _gguf_info(info) if info else None
    return report


def _check_policy(ad: LoraAdapter, spec: str, to: str, policy: RankPolicy | None) -> None:
    """A rank policy is needed for LyCORIS modules, and means nothing without them."""
    if ad.lyco and policy is None:
        raise FormatError(f"{spec}: " + lyco_message(
            ad, f"a {to} LoRA cannot hold them as they are", "choose the LoRA rank with "
            "--max-error 0.01 (a guaranteed error per module), --rank N, --energy F or "
            "--budget SIZE"))
    if policy is not None and not ad.lyco:
        raise FormatError(f"{spec}: a rank policy ({policy.describe()}) applies to LyCORIS "
                          "modules and this adapter has none; `loratool resize` changes a "
                          "LoRA's ranks")


def _gguf_info(info: dict[str, object]) -> GgufInfo:
    """What the GGUF writer reports, typed."""
    alpha, modules, rescaled, inexact = (info["alpha"], info["modules"], info["rescaled"],
                                         info["inexact"])
    assert isinstance(alpha, (int, float)) and isinstance(modules, int)
    assert isinstance(rescaled, int) and isinstance(inexact, list)
    return GgufInfo(alpha, modules, rescaled, [str(n) for n in inexact])


def _fits_pipeline(ad: LoraAdapter, root: Path, spec: str) -> None:
    """Each component of the adapter fits the pipeline's model of that name."""

    folders = pipeline_folders(root)
    for comp in ad.components:
        sub = component_folder(comp, folders, spec)
        match_base(only_component(ad, comp), open_checkpoint(str(root / sub)))


def _fit_lyco(ad: LoraAdapter, base: str | None, spec: str) -> None:
    """Give each module that is not LoRA its base weight's shape (and check it fits): a LoHa
    or LoKr conv stores ΔW flat, [out, in·kh·kw], and only the base knows the kernel; VeRA's
    tensors do not tell its inputs; IA³, OFT and BOFT change W by a product, so their ΔW is
    computed from the base weight itself."""

    if base is None:
        need = [m for m in ad.lyco.values() if not _known_alone(m)]
        if not need:
            return  # PEFT's AdaLoRA, LoHa and LoKr on linear layers: their tensors say it all
        m = need[0]
        why = (f"{TUNER_NAMES[m.kind]} changes W by a product, so its ΔW depends on W"
               if isinstance(m, TunerModule) and m.multiplicative else
               "VeRA's tensors do not tell each layer's inputs" if m.kind == "vera" else
               "LoHa and LoKr store a convolution's change flat, like a linear layer's, and "
               "only the base tells which each module is")
        raise FormatError(f"{spec}: converting {m.key} needs the base model (--base BASE): "
                          f"{why}")
    folders = pipeline_folders(Path(base)) if is_pipeline(base) else None
    ckpts: dict[str | None, Checkpoint] = {}
    for m in ad.lyco.values():
        sub = component_folder(m.component, folders, spec) if folders is not None else None
        if sub not in ckpts:
            ckpts[sub] = open_checkpoint(str(Path(base) / sub) if sub else base)
        ck = ckpts[sub]
        name = lyco_tensor(m, ck.tensors, ck.source or base)
        if isinstance(m, TunerModule) and m.multiplicative:
            m.base_weight = ck.load(name, dtype=torch.float32)
            bias = name[: -len(".weight")] + ".bias"
            if m.scales_bias and bias in ck.tensors:  # IA³ scales it: a lora bias of b·(l − 1)
                b = ck.load(bias, dtype=torch.float32)
                m.bias_change = m.apply(b.clone(), +1.0) - b


def _known_alone(m: OtherModule) -> bool:
    """Whether a module's ΔW needs nothing of the base (PEFT's AdaLoRA, LoHa, LoKr on linear
    layers, whose shapes their tensors give)."""
    if isinstance(m, TunerModule):
        return m.kind == "adalora"
    return m.dim is not None and m.layout == "linear" and "hada_t1" not in m.parts and \
        "lokr_t2" not in m.parts


def _dense(m: OtherModule) -> torch.Tensor:
    """A non-LoRA module's ΔW as a matrix [out, in·…] (float32); one that overflows float32
    (an adapter's or the base's values past it) cannot be factored: refused by name."""
    d = m.delta(torch.float32).reshape(m.shape[0], -1)
    if not bool(torch.isfinite(d).all()):
        raise FormatError(f"{m.key}: its ΔW holds NaN or Inf (its values or settings overflow "
                          "float32); it cannot become LoRA: check the adapter (and the base)")
    return d


@contextmanager
def _factoring(m: OtherModule) -> Iterator[None]:
    """An SVD that fails (a finite ΔW whose values are so large its norms overflow float32)
    is one line naming the module."""
    try:
        yield
    except torch.linalg.LinAlgError:
        raise FormatError(f"{m.key}: its ΔW cannot be factored (its values are so large that "
                          "the SVD overflows float32); check the adapter (and the base)"
                          ) from None


def lyco_to_lora(ad: LoraAdapter, policy: RankPolicy, dtype: str, seed: int = 0,
                 exact: bool = False, progress: Progress = SILENT) -> list[LycorisModule]:
    """Replace each LyCORIS module of ``ad`` by the truncated SVD of its dense ΔW at the
    policy's rank (a budget shared with the LoRA modules already there, which stay as they
    are); per module the rank and the relative error measured on the stored factors."""

    mods = list(ad.lyco.values())
    store = torch_dtype(DTYPES[dtype]) if DTYPES[dtype] else next(
        iter(mods[0].parts.values())).dtype
    chosen = _budget_ranks(ad, mods, policy, store, seed, exact, progress)
    entries = []
    for m in progress.iterate(mods, "LyCORIS → LoRA", unit="module"):
        with _factoring(m):
            f = factorize(_dense(m), policy, exact=exact, seed=module_seed(seed, m.key),
                          store_dtype=store, rank=chosen.get(m.key), name=m.key)
        entries.append(LycorisModule(m.key, m.kind, f.rank, f.rel_error, f.kept_energy))
        del ad.lyco[m.key]
        if not f.rank:
            continue
        k = f.rank
        A = f.A.reshape(k, *m.shape[1:]) if m.layout == "conv" else f.A
        B = f.B.reshape(m.shape[0], k, 1, 1) if m.layout == "conv" else f.B
        change = m.bias if m.bias is not None else getattr(m, "bias_change", None)
        bias = change.to(store) if change is not None else None
        ad.add(LoraModule(m.name, A.contiguous(), B.contiguous(), float(k), False, m.layout,
                          m.magnitude, bias, m.component))
    return entries


def _budget_ranks(ad: LoraAdapter, mods: list[OtherModule], policy: RankPolicy,
                  store: torch.dtype, seed: int, exact: bool, progress: Progress
                  ) -> dict[str, int]:
    """With a budget, each LyCORIS module's rank from the spectra of all of them (after the
    LoRA modules already there); without one, none (the policy decides per module)."""
    if policy.budget is None:
        return {}
    items, fixed = [], []
    for m in progress.iterate(mods, "spectra for the budget", unit="module"):
        D = _dense(m)
        cap = spectrum_cap(policy, min(D.shape))
        with _factoring(m):
            _, S, _, _ = spectrum(D, cap, exact, module_seed(seed, m.key))
        cost = policy.budget.cost(sum(D.shape), store.itemsize)
        items.append(BudgetItem(m.key, S[:cap], cost, cap, int(m.bias is not None)))
    for lm in ad.modules.values():
        fixed.append(Fixed("LoRA modules kept as they are", policy.budget.cost(
            lm.A.numel() + lm.B.numel(), lm.A.element_size()), None))
    return allocate(policy, items, fixed)
