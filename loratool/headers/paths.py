"""Inputs stay inside what the user named.

A folder input (a model, an adapter, a pipeline and its components) is read only through
files that resolve inside it: a symlink out of it, a ``..`` or an absolute path in an index
is refused by name, so that nothing from elsewhere on the machine (a key, another model) is
read, merged or copied into an output that may then be pushed. The Hugging Face cache's own
links (``snapshots/<rev>/file`` → ``blobs/<hash>`` of the same repo) resolve inside the
repo's cache folder and stay allowed. Special files (named pipes, devices, sockets) are
refused before they are opened: reading one would block or never end.

Example::
    root = containment_root(Path("model"))
    for rel, real in walk_files(Path("model"), root):
        shutil.copyfile(real, out / rel)
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Iterator

from ..errors import FormatError, InputError, OutsideInputError, os_input_error

HUB_CACHE_KINDS = ("models--", "datasets--", "spaces--")


def is_pipeline(spec: str | os.PathLike[str]) -> bool:
    """A local diffusers pipeline folder (it has model_index.json)."""
    return (Path(spec) / "model_index.json").is_file()


def check_exists(path: Path) -> None:
    """Raise a clear error for a missing path, a broken link or a symlink loop."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise InputError(f"{path}: broken symlink (its target does not exist)") from e
        raise os_input_error(path, e) from e


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is, in words; None for a file or a folder."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def check_regular(path: Path) -> None:
    """Only regular files are read: opening a FIFO or a device would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise os_input_error(path, e) from e
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a folder where a file was expected")
    kind = special_kind(mode)
    if kind is not None:
        raise InputError(f"{path}: is {kind}, not a regular file; name the file itself")


def containment_root(folder: Path) -> Path:
    """The real folder that ``folder``'s files must resolve inside: the folder itself, or for
    a snapshot in the Hugging Face cache (``…/models--org--name/snapshots/<rev>/…``) the
    repo's cache folder, whose ``blobs/`` its links point into."""
    real = Path(os.path.realpath(folder))
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(HUB_CACHE_KINDS):
            repo = Path(*parts[:i])
            if (repo / "blobs").is_dir():
                return repo
    return real


def resolve_inside(path: Path, root: Path, named: Path | str | None = None) -> Path:
    """The real path of ``path``, which must lie inside ``root`` (see :func:`containment_root`);
    ``named`` is the input the user gave, for the message."""
    real = Path(os.path.realpath(path))
    if real == root or real.is_relative_to(root):
        return real
    where = named if named is not None else root
    link = " is a symlink that" if os.path.islink(path) else ""
    raise OutsideInputError(f"{path}:{link} resolves to {real}, outside {where}; loratool "
                            "reads only files inside the folder it is given: copy the file "
                            "into it, or remove the link")


def member(folder: Path, rel: str, listed_in: Path) -> Path:
    """A file that an index or config names (``rel``) inside ``folder``: no absolute path, no
    ``..``, and it resolves inside the folder."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\0" in rel:
        raise FormatError(f"{listed_in}: names file {rel!r} outside its folder; refusing to "
                          "read it")
    resolve_inside(folder / p, containment_root(folder), folder)
    return folder / p


def entries(folder: Path, root: Path | None = None, named: Path | None = None
            ) -> list[tuple[str, Path, bool]]:
    """The non-hidden entries of ``folder`` as ``(name, real path, is a folder)``, sorted:
    each resolves inside ``root`` (default: the folder's containment root); a special file
    is a clear error naming it."""
    root = containment_root(folder) if root is None else root
    named = folder if named is None else named
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise os_input_error(folder, e) from e
    out = []
    for name in names:
        if name.startswith("."):
            continue
        p = folder / name
        real = resolve_inside(p, root, named)
        try:
            mode = os.stat(real).st_mode
        except OSError as e:
            raise os_input_error(p, e) from e
        kind = special_kind(mode)
        if kind is not None:
            raise OutsideInputError(f"{p}: is {kind}, not a regular file; remove it from "
                                    f"{named} (loratool never opens one)")
        out.append((name, real, stat.S_ISDIR(mode)))
    return out


def walk_files(folder: Path, root: Path | None = None, named: Path | None = None
               ) -> Iterator[tuple[str, Path]]:
    """Every regular file under ``folder`` as ``(relative posix path, real path)``, in sorted
    order, hidden entries left out (see :func:`entries`); links are followed only inside
    ``root``, each folder once."""
    root = containment_root(folder) if root is None else root
    named = folder if named is None else named
    seen: set[Path] = set()

    def walk(here: Path, rel: Path) -> Iterator[tuple[str, Path]]:
        real_here = Path(os.path.realpath(here))
        if real_here in seen:  # a link back to a folder already walked: a loop
            return
        seen.add(real_here)
        for name, real, is_dir in entries(here, root, named):
            if is_dir:
                yield from walk(here / name, rel / name)
            else:
                yield (rel / name).as_posix(), real

    resolve_inside(folder, root, named)
    yield from walk(folder, Path())


def copy_tree(src: Path, dst: Path, root: Path | None = None, named: Path | None = None
              ) -> None:
    """Copy every file :func:`walk_files` gives into ``dst`` (contents: links become files)."""

    dst.mkdir(parents=True, exist_ok=True)
    for rel, real in walk_files(src, root, named):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, dst / rel)
