"""``loratool convert``: any adapter format to any other, lossless or refused.

Reads with the format readers into the one ``LoraAdapter`` model and writes with the target's
writer. What the target cannot hold is named and refused, unless ``drop`` says to drop it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from ..io.tensors import open_checkpoint, torch_dtype
from ..model.adapter import (
    LoraModule,
    component_folder,
    is_pipeline,
    lyco_tensor,
    match_base,
    only_component,
    pipeline_folders,
)
from ..numerics.lowrank import (
    BudgetItem,
    Fixed,
    allocate,
    factorize,
    module_seed,
    spectrum,
    spectrum_cap,
)
from ..options import DTYPES
from ..progress import SILENT, Progress


def _local(spec: str | None) -> list[Path]:
    return [Path(spec)] if spec and Path(spec).exists() else []


def convert(spec: str, out: Path, to: str, base: str | None = None, force: bool = False,
            drop: bool = False, policy: Any = None, dtype: str = "keep", seed: int = 0,
            exact: bool = False, progress: Progress = SILENT) -> dict[str, Any]:
    """Convert ``spec`` to format ``to`` in ``out``; returns a report for the CLI. LyCORIS
    LoHa, LoKr and full modules become LoRA at the rank ``policy`` (required for them).

    Example: ``convert("adapter/", Path("lora.safetensors"), "kohya")``.
    """

    to = output_format(out, to, to, FORMATS)  # refuses -o x.safetensors for PEFT and the like
    ad = read_any(spec, base)
    if ad.lyco and policy is None:
        raise FormatError(f"{spec}: " + lyco_message(
            ad, f"a {to} LoRA cannot hold them as they are", "choose the LoRA rank with "
            "--max-error 0.01 (a guaranteed error per module), --rank N, --energy F or "
            "--budget SIZE"))
    if policy is not None and not ad.lyco:
        raise FormatError(f"{spec}: a rank policy ({policy.describe()}) applies to LyCORIS "
                          "modules and this adapter has none; `loratool resize` changes a "
                          "LoRA's ranks")
    if to != "kohya" or ad.lyco:
        require_resolved(ad, spec)
    base_ckpt = None
    same: list[str] = []
    if base and not is_pipeline(base):  # a pipeline is checked per component below

        base_ckpt = open_checkpoint(base)
        same = drop_base_copies(ad, base_ckpt)
    if ad.lyco:
        _fit_lyco(ad, base, spec)  # a conv stored flat takes its kernel from the base
    converted = lyco_to_lora(ad, policy, dtype, seed, exact, progress) if ad.lyco else []
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
    inputs = _local(spec) + _local(base)
    report: dict[str, Any] = {"input": spec, "source_format": ad.source_format, "format": to,
                              "modules": len(ad.modules), "full_tensors": len(ad.full),
                              "dropped": lost, "base_copies_left_out": same,
                              "rank_0_left_out": empty}
    if converted:
        report["lycoris"] = {"policy": policy.describe(), "modules": converted,
                             "max_rel_error": max(e["rel_error"] for e in converted)}
    note = f"Converted by loratool from a {ad.source_format} adapter."
    out_path, info = write_adapter(ad, out, to, base=base, force=force, inputs=inputs, note=note,
                                   with_info=True)
    report["output"] = out_path
    if info:
        report["gguf"] = info
    return report


def _fits_pipeline(ad: Any, root: Path, spec: str) -> None:
    """Each component of the adapter fits the pipeline's model of that name."""

    folders = pipeline_folders(root)
    for comp in ad.components:
        sub = component_folder(comp, folders, spec)
        match_base(only_component(ad, comp), open_checkpoint(str(root / sub)))


def _fit_lyco(ad: Any, base: str | None, spec: str) -> None:
    """Give each LyCORIS module its base weight's shape (and check it fits): a LoHa or LoKr
    conv stores ΔW flat, [out, in·kh·kw], and only the base knows the kernel."""

    if base is None:
        raise FormatError(f"{spec}: converting LyCORIS modules needs the base model (--base "
                          "BASE): LoHa and LoKr store a convolution's change flat, like a "
                          "linear layer's, and only the base tells which each module is")
    folders = pipeline_folders(Path(base)) if is_pipeline(base) else None
    ckpts: dict[Any, Any] = {}
    for m in ad.lyco.values():
        sub = component_folder(m.component, folders, spec) if folders is not None else None
        if sub not in ckpts:
            ckpts[sub] = open_checkpoint(str(Path(base) / sub) if sub else base)
        lyco_tensor(m, ckpts[sub].tensors, ckpts[sub].source or base)


def lyco_to_lora(ad: Any, policy: Any, dtype: str, seed: int, exact: bool,
                 progress: Progress = SILENT) -> list[dict[str, Any]]:
    """Replace each LyCORIS module of ``ad`` by the truncated SVD of its dense ΔW at the
    policy's rank (a budget shared with the LoRA modules already there, which stay as they
    are); per module the rank and the relative error measured on the stored factors."""

    mods = list(ad.lyco.values())
    store = torch_dtype(DTYPES[dtype]) if DTYPES[dtype] else next(
        iter(mods[0].parts.values())).dtype

    def dense(m: Any) -> Any:
        return m.delta(torch.float32).reshape(m.shape[0], -1)

    chosen: dict[str, int] = {}
    if policy.budget is not None:
        items, fixed = [], []
        for m in progress.iterate(mods, "spectra for the budget", unit="module"):
            D = dense(m)
            cap = spectrum_cap(policy, min(D.shape))
            _, S, _, _ = spectrum(D, cap, exact, module_seed(seed, m.key))
            cost = policy.budget.cost(sum(D.shape), store.itemsize)
            items.append(BudgetItem(m.key, S[:cap], cost, cap, int(m.bias is not None)))
        for m in ad.modules.values():
            fixed.append(Fixed("LoRA modules kept as they are", policy.budget.cost(
                m.A.numel() + m.B.numel(), m.A.element_size()), None))
        chosen = allocate(policy, items, fixed)
    entries = []
    for m in progress.iterate(mods, "LyCORIS → LoRA", unit="module"):
        D = dense(m)
        f = factorize(D, policy, exact=exact, seed=module_seed(seed, m.key), store_dtype=store,
                      rank=chosen.get(m.key), name=m.key)
        entries.append({"name": m.key, "type": m.kind, "rank": f.rank,
                        "rel_error": f.rel_error, "kept_energy": f.kept_energy})
        del ad.lyco[m.key]
        if not f.rank:
            continue
        k = f.rank
        A = f.A.reshape(k, *m.shape[1:]) if m.layout == "conv" else f.A
        B = f.B.reshape(m.shape[0], k, 1, 1) if m.layout == "conv" else f.B
        bias = m.bias.to(store) if m.bias is not None else None
        ad.add(LoraModule(m.name, A.contiguous(), B.contiguous(), float(k), False, m.layout,
                          m.magnitude, bias, m.component))
    return entries
