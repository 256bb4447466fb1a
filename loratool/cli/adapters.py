"""``loratool combine``, ``resize`` and ``convert``: adapters into adapters."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import check_weights
from ..verbs import prechecks
from .kit import (
    DTYPES,
    FORCE,
    FORMATS,
    JSON,
    WEIGHTS,
    adapter_out_options,
    notes,
    options_of,
    output,
    policy,
    progress,
    quiet_option,
    rank_policy_options,
    show,
    starting,
)


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--method", required=True, type=click.Choice(
    ["cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
    help="cat: exact sum; svd: exact sum recompressed; ties/dare/magnitude_prune: see docs.")
@WEIGHTS
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              show_default=True,
              help="Fraction of entries kept by ties, dare_* and magnitude_prune, 0 < D ≤ 1.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of DARE's drops.")
@click.option("--exact-svd", is_flag=True, help="Full SVD when factorising dense results.")
@adapter_out_options(one=False)
@click.pass_context
def combine(ctx: click.Context, adapters: tuple[str, ...], method: str,
            weights: tuple[float, ...], density: float, seed: int, exact_svd: bool, out: Path,
            rank: int | None, energy: float | None, max_error: float | None,
            budget: str | None, max_rank: int | None, fmt: str | None, base: str | None,
            dtype: str, force: bool, as_json: bool) -> None:
    """Combine adapters: exact weighted sums (cat), recompressed without dense matrices (svd),
    or TIES / DARE / magnitude pruning.

    \b
    Examples:
      loratool combine style/ task/ --method cat --weight 0.7 --weight 1 -o both/
      loratool combine a/ b/ c/ d/ --method svd --rank 16 -o merged-16/
      loratool combine a/ b/ --method ties --density 0.3 --rank 32 -o ties/
    """
    starting(ctx, f"combining {len(adapters)} adapters ({method}) → {out}")
    prechecks.adapters_out(list(adapters), out, force=force)
    if method == "cat" and all(v is None for v in (rank, energy, max_error, budget,
                                                       max_rank)):
        from ..verbs.combine_cat import cat_bytes  # torch-free: concatenation

        done = cat_bytes(list(adapters), out, check_weights(list(weights), len(adapters)),
                         fmt=fmt, dtype=dtype, base=base, seed=seed, force=force,
                         options=options_of(ctx), progress=progress(ctx))
        if done is not None:
            show(ctx, done, as_json)
            return
    from ..verbs.combine import combine as run

    report = run(list(adapters), out, method, weights=list(weights),
                 policy=policy(rank, energy, max_error, budget, max_rank),
                 density=density, seed=seed, fmt=fmt, dtype=dtype, exact_svd=exact_svd,
                 base=base, force=force, options=options_of(ctx), progress=progress(ctx))
    show(ctx, report, as_json)
    notes(ctx, report.notes)


@click.command()
@click.argument("adapter")
@adapter_out_options(one=True)
@click.pass_context
def resize(ctx: click.Context, adapter: str, out: Path, rank: int | None,
           energy: float | None, max_error: float | None, budget: str | None,
           max_rank: int | None, fmt: str | None, base: str | None, dtype: str, force: bool,
           as_json: bool) -> None:
    """Reduce an adapter's rank optimally (the truncated SVD of each module's B@A, computed
    from the factors), reporting the rank and the error per module.

    \b
    Examples:
      loratool resize ./adapter-r64 --rank 16 -o ./adapter-r16
      loratool resize ./adapter --energy 0.99 -o ./smaller
    """
    starting(ctx, f"resizing {adapter} → {out}")
    prechecks.adapters_out([adapter], out, force=force)
    from ..verbs.combine import resize as run

    report = run(adapter, out, policy=policy(rank, energy, max_error, budget, max_rank),
                 fmt=fmt, dtype=dtype, base=base, force=force, options=options_of(ctx),
                 progress=progress(ctx))
    show(ctx, report, as_json)
    notes(ctx, report.notes)


@click.command()
@click.argument("adapter")
@output("Output: a folder (PEFT), a .safetensors file or folder (kohya, diffusers), a .gguf "
         "file or folder (GGUF).")
@click.option("--format", "--to", "to", required=True, type=click.Choice(FORMATS),
              help="Target format.")
@click.option("--base", metavar="BASE",
              help="The base model (path or Hub id): resolves kohya names, gives GGUF its "
                   "architecture, and checks that the adapter fits.")
@click.option("--drop-unsupported", is_flag=True,
              help="Drop what the target format cannot hold (named in the report) instead of "
                   "refusing.")
@rank_policy_options
@click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
              help="dtype of the LoRA factors made from LyCORIS modules (keep: theirs).")
@FORCE
@JSON
@quiet_option
@click.pass_context
def convert(ctx: click.Context, adapter: str, out: Path, to: str, base: str | None,
            drop_unsupported: bool,
            rank: int | None, energy: float | None, max_error: float | None,
            budget: str | None, max_rank: int | None, dtype: str, force: bool,
            as_json: bool) -> None:
    """Convert an adapter between PEFT, kohya, diffusers and llama.cpp GGUF.

    The format of ADAPTER is detected from its content. Lossless where the target can hold the
    adapter; otherwise refused with what would be lost, unless --drop-unsupported. LyCORIS
    LoHa, LoKr and full modules become LoRA at the rank policy you choose (--max-error,
    --rank, --energy, --budget), the error of each module measured and reported.

    \b
    Examples:
      loratool convert ./my-peft-adapter --format kohya -o my-lora.safetensors
      loratool convert my-lora.safetensors --format peft -o ./peft-adapter --base ./sd15/unet
      loratool convert ./my-peft-adapter --format gguf -o adapter.gguf --base org/Llama-3.2-1B
      loratool convert loha.safetensors --to kohya --max-error 0.01 --base sdxl/ -o l.safetensors
    """
    starting(ctx, f"converting {adapter} to {to} → {out}")
    prechecks.convert(adapter, out, to, base=base, drop=drop_unsupported, force=force)
    from ..verbs.convert import convert as run

    show(ctx, run(adapter, out, to, base=base, drop=drop_unsupported,
             policy=policy(rank, energy, max_error, budget, max_rank), dtype=dtype,
             force=force, options=options_of(ctx), progress=progress(ctx)), as_json)
