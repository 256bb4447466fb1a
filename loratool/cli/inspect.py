"""``loratool inspect``: what a checkpoint or adapter holds, from its headers alone."""

from __future__ import annotations

import click

from .kit import (
    echo,
    progress,
    quiet_option,
    starting,
    state,
)


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (see docs/cli.md).")
@click.option("--filter", "filters", multiple=True, metavar="GLOB",
              help="Only tensors/modules whose name matches GLOB (repeatable).")
@click.option("--against", metavar="OTHER",
              help="Compare with another checkpoint tensor by tensor (reads tensor data).")
@click.option("--all", "expand", is_flag=True, help="List every tensor instead of groups.")
@quiet_option
@click.pass_context
def inspect(ctx: click.Context, path: str, as_json: bool, filters: tuple[str, ...],
            against: str | None, expand: bool) -> None:
    """Show what is in a checkpoint or adapter, from its headers alone.

    \b
    Examples:
      loratool inspect ./Llama-3.2-1B
      loratool inspect ./my-adapter --json
      loratool inspect base/ --against tuned/ --filter '*layers.0.*'
    """
    starting(ctx, f"comparing {path} with {against}" if against else f"reading {path}")
    from ..verbs.inspect import inspect as run

    report = run(path, filters=list(filters), against=against, progress=progress(ctx))
    state(ctx).clear()
    if as_json:
        click.echo(report.to_json())  # JSON escapes control characters itself
    else:
        echo(report.render(expand=expand))
