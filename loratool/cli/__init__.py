"""The command line: click commands over the public API, inside one error boundary."""

from .. import interrupts

interrupts.install(armed=False)  # first: a Ctrl-C now waits for the boundary (exit 130)

from .app import cli, main  # noqa: E402

__all__ = ["cli", "main"]
