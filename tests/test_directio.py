"""The page-cache-bypassing writer: the same bytes whatever the buffer boundaries, the file
system's answer to O_DIRECT, or the platform; errors of its thread reach the caller."""

from __future__ import annotations

import errno
import os
import random

import pytest

from loratool.io.directio import SequentialWriter


def _pieces(rng: random.Random, src: bytes) -> list[tuple[str, int, int]]:
    """A mix of appended bytes and copies of ranges of ``src``, sizes around the chunk."""
    out = []
    for _ in range(40):
        n = rng.choice([0, 1, 7, 4095, 4096, 4097, 8192, 12345, 30000])
        out.append((rng.choice(["write", "copy"]), rng.randrange(len(src) - n), n))
    return out


def _write(path, src_path, src: bytes, pieces, chunk: int) -> bytes:
    w = SequentialWriter(path, chunk=chunk)
    expect = bytearray()
    with open(src_path, "rb") as f:
        for kind, off, n in pieces:
            if kind == "write":
                w.write(memoryview(src[off:off + n]))
            else:
                assert w.copy_from(f, off, n) == n
            expect += src[off:off + n]
    w.close()
    assert w.size == len(expect)
    return bytes(expect)


@pytest.mark.parametrize("mode", ["as it comes", "open refuses O_DIRECT",
                                  "first write refuses O_DIRECT", "no pread/preadv"])
def test_same_bytes_whatever_the_path(tmp_path, monkeypatch, mode):
    rng = random.Random(3)
    src = rng.randbytes(200_000)
    (tmp_path / "src").write_bytes(src)
    pieces = _pieces(rng, src)
    if mode == "open refuses O_DIRECT":
        real_open = os.open

        def no_direct(path, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)

        monkeypatch.setattr(os, "open", no_direct)
    elif mode == "first write refuses O_DIRECT":
        import fcntl

        real_pwrite = os.pwrite

        def refuse(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refuse)
    elif mode == "no pread/preadv":
        for name in ("preadv", "pread"):
            monkeypatch.delattr(os, name, raising=False)
    for chunk in (8192, 1 << 16):
        out = tmp_path / f"out-{chunk}"
        expect = _write(out, tmp_path / "src", src, pieces, chunk)
        assert out.read_bytes() == expect


def test_an_error_of_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    w = SequentialWriter(tmp_path / "x", chunk=8192)
    with pytest.raises(OSError) as e:
        for _ in range(4):  # the second full buffer waits for the first one's write
            w.write(memoryview(bytes(8192)))
        w.close()
    assert e.value.errno == errno.ENOSPC
    w.discard()  # after an error: stops without raising again
