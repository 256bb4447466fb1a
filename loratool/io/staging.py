"""Outputs that appear whole or not at all, never lose an existing one, and survive a crash.

Every command that writes goes through :class:`Stage`: it claims the output name (a lock file
beside it, so that a second run to the same output is refused instead of racing), removes what
a killed run left there, writes into a temporary folder beside the output, flushes every file
and folder to disk, and renames the result into place only when it is complete (and, where
asked, verified). An existing output (``--force``) is moved aside first and deleted only once
the new one is in place, so an interrupt at any moment leaves the old output or the new one.

Example::
    with Stage(Path("out"), inputs=[base], force=False) as stage:
        (stage.tmp / "model.safetensors").write_bytes(data)
        stage.publish()
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputError, os_message
from ..interrupts import check_interrupted, held
from ..options import Options, OutputRecord

if TYPE_CHECKING:
    from types import TracebackType

try:  # the lock of an output being written: fcntl on POSIX, msvcrt on Windows
    import fcntl
    msvcrt = None
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None  # type: ignore[assignment]
    import msvcrt  # type: ignore[no-redef]

# Top-level names an output of loratool, transformers, PEFT or an exporter holds: --force
# replaces a folder only when it holds one of them (or nothing), never an unrelated folder.
OUTPUT_MARKERS = (".safetensors", ".gguf", ".onnx", ".onnx.data", ".bin", ".pt",
                  "config.json", "adapter_config.json", "export.json", ".index.json",
                  "model_index.json")


@dataclass(frozen=True)
class OutputKind:
    """What an output of one flag looks like, so that ``--force`` replaces only that: a file
    or folder named like ``markers`` (``every``: a folder whose every file is)."""

    flag: str
    markers: tuple[str, ...]
    every: bool = False
    what: str = "a model or adapter"


MODEL_OUTPUT = OutputKind("-o", OUTPUT_MARKERS)
REPORT_OUTPUT = OutputKind("--report", (".json",), what="a JSON report")
HTML_OUTPUT = OutputKind("--html", (".html", ".htm"), what="an HTML page")
PLOTS_OUTPUT = OutputKind("--plot", (".png",), every=True, what="a folder of PNG figures")


def output_os_error(path: Path, e: OSError, need: int | None = None) -> OutputError:
    """One line for an OS error while writing ``path``: what happened and what to do."""
    where = f"cannot write {path}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(_existing_parent(path)).free
            room = f"; {free / 1e9:.2f} GB free" + (f", at least {need / 1e9:.2f} GB needed"
                                                    if need else "")
        except OSError:
            room = ""
        kind = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota full"
        return OutputError(f"{where}: {kind}{room}; free some space or choose another -o "
                           "(nothing was written)")
    return OutputError(f"{where}: {os_message(e, _WRITING, '')}")


_WRITING = {errno.EROFS: "the file system is read-only; choose another -o",
            errno.EACCES: "permission denied; choose a folder you can write to",
            errno.EPERM: "permission denied; choose a folder you can write to",
            errno.ENAMETOOLONG: "file name too long; choose a shorter -o"}


def _existing_parent(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _resolve(p: Path) -> Path:
    return Path(os.path.realpath(p))


def check_output(out: Path, inputs: list[Path], force: bool,
                 kind: OutputKind = MODEL_OUTPUT) -> None:
    """Refuse an output that is, holds or lies inside an input, or that holds the current
    folder; refuse an existing one unless ``force``, and with ``force`` one that does not
    look like what ``kind`` writes (an unrelated folder is never deleted)."""
    o = _resolve(out)
    flag = kind.flag
    for i in inputs:
        r = _resolve(i)
        if o == r or r.is_relative_to(o) or o.is_relative_to(r):
            raise OutputError(f"output {out} is or overlaps input {i}; choose another {flag} "
                              "(inputs are never overwritten)")
    if not os.path.lexists(out):
        return
    if not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it or choose "
                          f"another {flag}")
    if Path(os.getcwd()).resolve().is_relative_to(o) or o == Path(o.anchor):
        raise OutputError(f"output {out} holds the current folder; refusing to replace it")
    foreign = _foreign(Path(out), kind)
    if foreign:
        raise OutputError(f"output {out} holds files that are not {kind.what} "
                          f"({', '.join(foreign[:3])}); --force only replaces outputs like "
                          f"the ones loratool writes: remove it yourself or choose another "
                          f"{flag}")


def _foreign(out: Path, kind: OutputKind) -> list[str]:
    """Why ``out`` does not look like an output --force may replace ([] when it does)."""
    if out.is_symlink() or not out.is_dir():
        return [] if out.name.endswith(kind.markers) or out.is_symlink() else [out.name]
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise output_os_error(out, e) from e
    hits = [n.endswith(kind.markers) for n in names]
    if not names or (all(hits) if kind.every else any(hits)):
        return []
    return [n for n, h in zip(names, hits) if not h] if kind.every else names


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _sync(path: Path) -> None:
    """fsync one file or folder (folders: where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a folder cannot be opened on some platforms: nothing to sync there
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file, then every folder, under ``root`` (a file: just it)."""
    if root.is_file():
        _sync(root)
        return
    for folder, _, files in os.walk(root, topdown=False):
        for f in files:
            _sync(Path(folder) / f)
        _sync(Path(folder))


class Stage:
    """A temporary folder beside ``out`` that becomes ``out`` when :meth:`publish` is called;
    anything else (an error, Ctrl-C, SIGTERM) removes it. ``file``: the output is one file,
    ``tmp / file``, published as ``out`` itself."""

    def __init__(self, out: Path, inputs: list[Path] | None = None, force: bool = False,
                 file: str | None = None, kind: OutputKind = MODEL_OUTPUT,
                 options: Options | None = None) -> None:
        self.out = Path(os.path.abspath(out))
        if self.out.name in ("", ".", ".."):
            raise OutputError(f"output {out} is not a usable file or folder name")
        self.inputs = list(inputs or [])
        self.force = force
        self.file = file
        self.kind = kind
        self.tmp: Path | None = None
        self.created: list[Path] = []  # parent folders made here, removed again on failure
        self.lock: Path | None = None
        self._lock_fd = -1
        self.published = False
        self.options = options or Options()
        self.record: OutputRecord | None = None
        check_output(self.out, self.inputs, force, kind)
        self.existed = os.path.lexists(self.out)

    # -- claiming the name ---------------------------------------------------------------

    def _names(self) -> re.Pattern[str]:
        return re.compile(rf"^\.{re.escape(self.out.name)}\.(\d+)\.(?:[^/]*\.partial|old)$")

    def _clean_stale(self, parent: Path) -> None:
        """Remove what a killed run (its process gone) left beside this output."""
        pattern = self._names()
        for entry in os.listdir(parent):
            m = pattern.match(entry)
            if m and not _alive(int(m.group(1))):
                p = parent / entry
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def _claim(self, parent: Path) -> None:
        """An exclusive lock on ``.NAME.lock`` beside the output, held until the end: a
        second run to the same output is refused at once instead of racing (the kernel
        drops the lock of a killed process, so nothing goes stale)."""
        lock = parent / f".{self.out.name}.lock"
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            if not _try_lock(fd):
                try:
                    pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise OutputError(f"another loratool (process {pid}) is writing {self.out}; "
                                  "wait for it to finish, or choose another -o")
            try:  # the file may have been removed (and re-made) by the run that held it
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.lock, self._lock_fd = lock, fd

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)  # before closing: the next run gets a new file
            os.close(self._lock_fd)
            self.lock = None

    # -- the temporary folder ----------------------------------------------------------

    def __enter__(self) -> "Stage":
        parent = self.out.parent
        if self.options.log is not None:
            self.record = self.options.log.began(self.out, self.existed)
        try:
            p = parent
            while not p.exists():
                self.created.append(p)
                p = p.parent
            parent.mkdir(parents=True, exist_ok=True)
            self._clean_stale(parent)
            with held():  # the temporary folder is made and remembered, or neither
                self._claim(parent)
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.",
                                                 suffix=".partial", dir=parent))
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared
        except OSError as e:
            self.abort()
            raise output_os_error(self.out, e) from e
        except BaseException:
            self.abort()
            raise
        return self

    def publish(self) -> None:
        """Flush everything to disk and rename it into place (the old output, if any, is
        moved aside first and deleted only once the new one is there)."""
        assert self.tmp is not None
        check_interrupted()  # a Ctrl-C that something swallowed still stops the publish
        new = self.tmp / self.file if self.file else self.tmp
        try:
            if self.options.fsync:
                sync_tree(new)
            if os.path.lexists(self.out) and not self.force:
                raise OutputError(f"output {self.out} appeared while this run was writing it; "
                                  "nothing was replaced (pass --force to replace it)")
            # from the rename to the clean-up, an interrupt waits: the output is in place,
            # and nothing temporary is left beside it
            with held():
                _swap(new, self.out, self.inputs, self.kind)
                self.published = True
                if self.record is not None:
                    self.record.published = True
                if self.file:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
                self.created = []
                self._release()
                if self.options.fsync:
                    _sync(self.out.parent)
        except OSError as e:
            raise output_os_error(self.out, e) from e

    def abort(self) -> None:
        """Remove everything written so far, and the parent folders this stage made (an
        interrupt waits until that is done)."""
        with held(raise_after=False):
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            self._release()  # before the parents: the lock file lives in one of them
            for d in self.created:
                try:
                    d.rmdir()
                except OSError:
                    break
            self.created = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.published:
            self.abort()


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another process holds it."""
    if fcntl is None:  # Windows: msvcrt locks a byte range instead
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,union-attr]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap(new: Path, out: Path, inputs: list[Path], kind: OutputKind) -> None:
    """Rename ``new`` onto ``out``; an existing ``out`` is moved aside first and put back if
    the rename fails, so the user never ends up with neither; then it is deleted."""
    old: Path | None = None
    if os.path.lexists(out):
        check_output(out, inputs, True, kind)
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
