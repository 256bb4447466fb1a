"""The command line: a thin click group over the public API, and the one error boundary in
:func:`main`.

Commands parse flags (ranges and forms are checked by click's types: a bad value is a usage
error, exit 2), call a verb, and print what its report renders. Only the command line prints;
one module per verb or pair of verbs (``cli/merge.py`` …) holds the commands.
"""

from __future__ import annotations

import click

from ..about import __version__
from . import adapters, analyze, demo, export, extract, hub, inspect, merge
from .kit import State, run


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             invoke_without_command=True)
@click.version_option(__version__, prog_name="loratool")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Model surgery and LoRA adapter management.

    Inputs may be local paths or Hub ids (org/name or org/name@revision).
    Run `loratool demo` for a tour on a small built-in model.
    """
    if ctx.obj is None:  # the group called as it is, outside main()'s boundary
        ctx.obj = State()
    ctx.obj.quiet = ctx.obj.quiet or quiet
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


for command in (inspect.inspect, extract.extract, merge.merge, merge.unmerge,
                adapters.combine, adapters.resize, adapters.convert, export.export,
                analyze.analyze, hub.pull, hub.push, demo.demo):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: the CLI inside the one error boundary (``kit.run``); with ``argv``
    (a caller in Python) an interrupt raises SystemExit(130) instead of exiting at once."""
    run(cli, argv)
