"""``loratool extract``: a LoRA adapter from a base and a fine-tune."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import RankPolicy
from ..verbs import prechecks
from .kit import extract_options, notes, options_of, progress, show, starting


@click.command()
@click.argument("base")
@click.argument("tuned")
@extract_options
@click.pass_context
def extract(ctx: click.Context, base: str, tuned: str, out: Path, rank: int | None,
            energy: float | None, max_error: float | None, budget: str | None,
            max_rank: int | None, targets: tuple[str, ...], excludes: tuple[str, ...],
            device: str, fmt: str | None, dtype: str, exact_svd: bool, embed_lora: bool,
            skip_full: bool, seed: int, report_path: Path | None, force: bool,
            as_json: bool) -> None:
    """Extract a LoRA adapter from a fine-tuned model: ΔW = TUNED − BASE, factorised.

    A randomized SVD per changed weight at the rank the policy picks; the error of the stored
    factors is measured and reported per module.

    \b
    Examples:
      loratool extract ./base ./tuned -o ./adapter --rank 32
      loratool extract ./base ./tuned -o ./adapter --max-error 0.05 --max-rank 128
      loratool extract ./base ./tuned -o ./adapter --budget 50MB --report report.json
    """
    policy = RankPolicy.from_options(rank, energy, max_error, budget, max_rank)
    starting(ctx, f"extracting {tuned} − {base} → {out}")
    prechecks.extract(base, tuned, out, report_path, force=force, policy=policy,
                      targets=list(targets), excludes=list(excludes), embed_lora=embed_lora,
                      skip_full=skip_full, dtype=dtype)
    from ..verbs.extract import extract as verb

    report = verb(base, tuned, out, policy=policy, targets=list(targets),
                  excludes=list(excludes), device=device, fmt=fmt, exact_svd=exact_svd,
                  embed_lora=embed_lora, skip_full=skip_full, seed=seed, dtype=dtype,
                  force=force, report_path=report_path, options=options_of(ctx),
                  progress=progress(ctx))
    show(ctx, report, as_json)
    notes(ctx, report.notes)
