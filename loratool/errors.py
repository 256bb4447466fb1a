"""Expected failures: each carries one line that says what is wrong and how to fix it.

The CLI's error boundary prints ``str(error)`` and exits 1 for these; anything else is a bug
and is shown with its traceback only when ``LORATOOL_DEBUG=1``.
"""

from __future__ import annotations

import errno


class LoraToolError(Exception):
    """A user mistake or a bad file: the message is shown to the user as it is."""


class UsageError(LoraToolError):
    """Options that cannot work together or a value out of range: exit code 2, as click's own
    usage errors."""


class InputError(LoraToolError):
    """An input path or Hub id that cannot be found or opened."""


class OutsideInputError(InputError):
    """A file inside a folder input that resolves outside it (a symlink out, ``..``), or a
    special file: refused, never read."""


class FormatError(LoraToolError):
    """A file that is damaged or not in a format loratool reads."""


class UnsafeFileError(FormatError):
    """A file that would need to run pickled code to load."""


class OutputError(LoraToolError):
    """An output that cannot be written (exists, is an input, no space …)."""


class HubError(LoraToolError):
    """A Hugging Face Hub call that failed (not found, no permission, offline …)."""


def os_message(e: OSError, hints: dict[int, str], default: str) -> str:
    """What an OS error means for the user, from a table of errno → advice."""
    said = str(e.strerror or e)
    return hints.get(e.errno or 0) or (f"{default} ({said})" if default else said)


_READING = {errno.ELOOP: "symlink loop; point the path at a real file or folder",
            errno.EACCES: "permission denied; make it readable (chmod +r) and retry",
            errno.EPERM: "permission denied; make it readable (chmod +r) and retry",
            errno.ENOENT: "no such file or folder",
            errno.EISDIR: "is a folder where a file was expected"}


def os_input_error(path: object, e: OSError) -> InputError:
    """One line for an OS error while reading ``path``: what happened and what to do."""
    return InputError(f"{path}: {os_message(e, _READING, 'cannot read')}")
