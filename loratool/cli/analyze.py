"""``loratool analyze``: how low-rank a fine-tune or an adapter is, and what two share."""

from __future__ import annotations

from pathlib import Path

import click

from .kit import (
    analyze_options,
    options_of,
    progress,
    safe,
    show,
    starting,
)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@analyze_options
@click.pass_context
def analyze(ctx: click.Context, paths: tuple[str, ...], base: str | None, compare: bool,
            subspace: str, energies: tuple[float, ...], rank: int | None, max_rank: int,
            targets: tuple[str, ...], excludes: tuple[str, ...], device: str, exact_svd: bool,
            seed: int, plot: Path | None, html: Path | None, force: bool,
            as_json: bool) -> None:
    """How low-rank is a fine-tune, an adapter, or what two adapters share: the LoRA
    paper's analysis (spectrum and effective rank of ΔW, amplification, subspace similarity).

    PATHS is BASE TUNED (a fine-tune), ADAPTER (with --base for the amplification), or, with
    --compare, two adapters.

    \b
    Examples:
      loratool analyze ./Llama-3.2-1B ./my-finetune --plot plots/ --html analysis.html
      loratool analyze ./my-adapter --base ./Llama-3.2-1B
      loratool analyze --compare ./adapter-r8 ./adapter-r64
    """
    starting(ctx, f"analyzing {' '.join(paths)}")
    from ..verbs import plots  # torch-free: its outputs are checked before torch loads

    inputs = [Path(p) for p in (*paths, base) if p and Path(p).exists()]
    plots.check_outputs(plot, html, inputs, force)
    from ..verbs.analyze import analyze as run_analysis

    report = run_analysis(list(paths), base=base, compare=compare, subspace=subspace,
                          energies=tuple(energies) or (0.5, 0.9, 0.99), rank=rank,
                          max_rank=max_rank, targets=list(targets), excludes=list(excludes),
                          device=device, exact_svd=exact_svd, seed=seed,
                          progress=progress(ctx))
    if plot or html:  # the page shows the table as the terminal would
        report.written = plots.write(report, plot, html, safe(report.render()), inputs, force,
                                     options=options_of(ctx))
    show(ctx, report, as_json)
