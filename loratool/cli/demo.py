"""``loratool demo``: every command on a small model built on the spot."""

from __future__ import annotations

from pathlib import Path

import click

from .kit import (
    echo,
    options_of,
    progress,
    quiet_option,
    starting,
    state,
)


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("loratool-demo"),
              show_default=True, help="Where the demo models and results are written.")
@quiet_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path) -> None:
    """Build a small Llama-style model and a fine-tune of it, and run every command on them.

    Nothing is downloaded. Example: loratool demo --workdir /tmp/demo
    """
    starting(ctx, f"building a small model and its fine-tune in {workdir}")
    from ..verbs.demo import run_demo

    for section in run_demo(workdir, options_of(ctx), progress(ctx)):
        state(ctx).clear()
        echo(section)
