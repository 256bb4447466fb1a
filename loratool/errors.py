"""Expected failures: each carries one line that says what is wrong and how to fix it.

The CLI's error boundary prints ``str(error)`` and exits 1 for these; anything else is a bug
and is shown with its traceback only when ``LORATOOL_DEBUG=1``.
"""

from __future__ import annotations


class LoraToolError(Exception):
    """A user mistake or a bad file: the message is shown to the user as it is."""


class UsageError(LoraToolError):
    """Options that cannot work together or a value out of range: exit code 2, as click's own
    usage errors."""


class InputError(LoraToolError):
    """An input path or Hub id that cannot be found or opened."""


class FormatError(LoraToolError):
    """A file that is damaged or not in a format loratool reads."""


class UnsafeFileError(FormatError):
    """A file that would need to run pickled code to load."""


class OutputError(LoraToolError):
    """An output that cannot be written (exists, is an input, no space …)."""


class HubError(LoraToolError):
    """A Hugging Face Hub call that failed (not found, no permission, offline …)."""
