"""The command line: click commands over the public API, inside one error boundary.

Each command (one module per command or family) parses its flags, shows its first line, runs
the checks that need no tensor (``verbs.prechecks``), calls the verb of the public API and
shows the report it returns (its text, or ``--json``); the verb's module is imported when the
command runs, so that every other command starts without it (and without torch).
"""

from .. import interrupts

interrupts.install(armed=False)  # first: a Ctrl-C now waits for the boundary (exit 130)

from .app import cli, main  # noqa: E402

__all__ = ["cli", "main"]
