"""Sizes as people write and read them: ``5GB``, ``2GiB``, ``163.8M``, ``1.50 MB``."""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"2GiB"`` → 2·2³⁰, ``"1000"`` → 1000, as transformers reads
    sizes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise UsageError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return value


def human_count(n: float) -> str:
    """``163_840_000`` → ``163.8M``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    """``1_500_000`` → ``1.50 MB`` (powers of 1000, as the Hub shows sizes)."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def natural_key(s: str) -> list[tuple[int, int | str]]:
    """Sort key that puts ``layers.10`` after ``layers.9``."""
    return [(1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"(\d+)", s)]


def matches(name: str, globs: Iterable[str] | None) -> bool:
    """Whether ``name`` matches one of the shell-style ``globs`` (no globs: everything)."""

    globs = list(globs or [])
    return not globs or any(fnmatch.fnmatchcase(name, g) for g in globs)
