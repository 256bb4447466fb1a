"""Sequential file writes that bypass the page cache, overlapped with the caller's work.

A merged model is written once and never read back by the process that writes it. Through
the page cache every byte first needs a fresh page from the kernel, then a flush: on virtual
machines that hand freed memory back to their host, the fresh pages alone cost ~2 s per GB,
more than the disk does. With ``O_DIRECT`` the bytes go from two reused, aligned buffers
straight to the device, one buffer filled by the caller while a background thread writes the
other. Where a file system refuses ``O_DIRECT`` (tmpfs on older kernels, some FUSE and
network file systems; macOS and Windows have no such flag) the same class writes through the
page cache, still in the background.

Example::
    w = SequentialWriter(Path("x.bin"))
    w.write(memoryview(b"header"))
    w.copy_from(src_file, offset=0, nbytes=1 << 20)
    w.close()
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..headers.safetensors import pread_into

if TYPE_CHECKING:
    from types import TracebackType

try:  # O_DIRECT taken back from a file that refuses it (Linux)
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None  # type: ignore[assignment]

ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size (≤ 4 KiB)
CHUNK = 16 << 20  # one buffer; large enough that a write is one device request queue's worth


class SequentialWriter:
    """Write a new file front to back through two aligned buffers, each written by a
    background thread while the caller fills the other. ``size`` counts the bytes accepted."""

    def __init__(self, path: Path, chunk: int = CHUNK, direct: bool = True) -> None:
        self.path = path
        self.chunk = chunk
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0) | \
            getattr(os, "O_CLOEXEC", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")  # ``direct``: Options.direct_io
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:
                raise
            self.direct = False  # the file system refuses O_DIRECT
            self.fd = os.open(path, flags, 0o644)
        self._bufs = [mmap.mmap(-1, chunk) for _ in range(2)]  # page-aligned, reused
        self._views = [memoryview(b) for b in self._bufs]
        self._cur = 0
        self._fill = 0
        self._flushed = 0  # bytes handed to the writer thread (whole buffers until close)
        self.size = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loratool-write")
        self._pending: Future[None] | None = None
        self.closed = False

    def __enter__(self) -> "SequentialWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Finished on success; after an error only stopped (the caller removes the file)."""
        self.close() if exc_type is None else self.discard()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes (copied into the buffers: ``data`` may be reused at once)."""
        done, total = 0, len(data)
        while done < total:
            n = min(total - done, self.chunk - self._fill)
            self._views[self._cur][self._fill:self._fill + n] = data[done:done + n]
            self._advance(n)
            done += n

    def copy_from(self, f: BinaryIO, offset: int, nbytes: int) -> int:
        """Append ``nbytes`` of the open file ``f`` from ``offset``, read straight into the
        buffers; returns how many there were (fewer only at the source's end)."""
        done = 0
        while done < nbytes:
            n = min(nbytes - done, self.chunk - self._fill)
            got = pread_into(f, self._views[self._cur][self._fill:self._fill + n],
                             offset + done)
            if got == 0:
                return done
            self._advance(got)
            done += got
        return done

    def _advance(self, n: int) -> None:
        self._fill += n
        self.size += n
        if self._fill == self.chunk:
            self._hand_over()

    def _hand_over(self) -> None:
        """The current buffer goes to the writer thread; the caller moves to the other one
        (once its previous write is done)."""
        if self._pending is not None:
            self._pending.result()  # raises the writer's error (a full disk) here
        length = self._fill
        if self.direct and length % ALIGN:  # the last buffer: padded, cut back at close
            pad = -length % ALIGN
            self._views[self._cur][length:length + pad] = bytes(pad)
            length += pad
        self._pending = self._pool.submit(self._pwrite, self._views[self._cur][:length],
                                          self._flushed)
        self._flushed += self._fill
        self._cur ^= 1
        self._fill = 0

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                if hasattr(os, "pwrite"):
                    n = os.pwrite(self.fd, view[done:], offset + done)
                else:  # Windows: one writer thread, so seek + write is safe
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    n = os.write(self.fd, view[done:])
            except OSError as e:
                # accepted at open, refused at the first write (some FUSE file systems)
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                assert fcntl is not None  # O_DIRECT exists on Linux only
                fcntl.fcntl(self.fd, fcntl.F_SETFL,
                            fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                continue
            if n == 0:
                raise OSError(errno.EIO, "write returned 0 bytes", str(self.path))
            done += n

    def close(self) -> None:
        """Write what is left and wait for it; the file then holds exactly ``size`` bytes."""
        if self.closed:
            return
        try:
            if self._fill:
                self._hand_over()
            if self._pending is not None:
                self._pending.result()
            if os.fstat(self.fd).st_size != self.size:  # the last buffer's padding
                os.ftruncate(self.fd, self.size)
        finally:
            self.discard()

    def discard(self) -> None:
        """Stop without finishing (after an error or an interrupt): the file is removed by
        whoever owns its folder."""
        if self.closed:
            return
        self.closed = True
        if self._pending is not None:
            self._pending.cancel()
            try:
                self._pending.result()
            except BaseException:  # the error that brought us here was already raised
                pass
        self._pool.shutdown(wait=True)
        os.close(self.fd)
        # the buffers go with the last reference (a raised error's frames may still hold a
        # slice of one, which an explicit close would refuse)
        self._views, self._bufs = [], []
