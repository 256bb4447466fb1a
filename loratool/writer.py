"""Write safetensors checkpoints atomically, streaming one tensor at a time.

Tensors go to a temporary folder beside the target; shards are cut at a size limit and named
as transformers names them (``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json``, or a single ``model.safetensors``). Only when everything is
written is the folder renamed into place; any exception or Ctrl-C removes it, so a failed run
leaves no partial output and never touches an input.

Example::

    with CheckpointWriter(Path("out"), inputs=[base], copy_from=base) as w:
        for name in names:
            w.add(name, tensor)
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .checkpoint import dtype_code, weight_file_names
from .errors import LoraToolError, OutputError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD = 5 * 10**9  # transformers' default "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Files of a source folder that never travel to an output: weights, model cards, VCS state.
NOT_COPIED = {"README.md", ".gitattributes", "adapter_config.json"}


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"2GiB"`` → 2·2³⁰, ``"1000"`` → 1000, as transformers reads
    sizes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise LoraToolError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if value <= 0:
        raise LoraToolError(f"size {text!r} must be positive")
    return value


def _resolve(p: Path) -> Path:
    return Path(os.path.realpath(p))


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that is, holds or lies inside an input; refuse an existing one unless
    ``force``."""
    o = _resolve(out)
    for i in inputs:
        r = _resolve(i)
        if o == r or r.is_relative_to(o) or o.is_relative_to(r):
            raise OutputError(f"output {out} is or overlaps input {i}; choose another -o folder "
                              "(inputs are never overwritten)")
    if os.path.lexists(out) and not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it or choose "
                          "another -o")


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """A zero-copy view of a CPU tensor's bytes (no numpy needed); keep ``t`` alive meanwhile."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class _Shard:
    """One shard being written: data goes to a side file, the header is written at close."""

    def __init__(self, folder: Path, number: int) -> None:
        self.data_path = folder / f".shard-{number:05d}.data"
        self.path = folder / f".shard-{number:05d}.safetensors"
        self.f: BinaryIO = open(self.data_path, "wb")
        self.header: dict[str, Any] = {}
        self.size = 0

    def add(self, name: str, t: "torch.Tensor") -> None:
        view = tensor_bytes(t)
        self.f.write(view)
        self.header[name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape),
                             "data_offsets": [self.size, self.size + len(view)]}
        self.size += len(view)

    def close(self, metadata: dict[str, str]) -> None:
        self.f.close()
        head = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":"))
        raw = head.encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self.data_path.unlink()


class CheckpointWriter:
    """Stream tensors into a new checkpoint folder that appears only when complete."""

    def __init__(self, out: Path | str, *, inputs: list[Path] | None = None, force: bool = False,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD, copy_from: Path | None = None,
                 filename: str = "model.safetensors",
                 metadata: dict[str, str] | None = None, single_file: bool = False) -> None:
        self.out = Path(out)
        # single_file: ``out`` is the .safetensors file itself (kohya, diffusers), never sharded
        self.single_file = single_file
        if single_file:
            filename = self.out.name
            max_shard_size = 1 << 62
        self.inputs = list(inputs or [])
        self.force = force
        self.max_shard_size = parse_size(max_shard_size)
        self.copy_from = copy_from
        self.filename = filename
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp: Path | None = None
        self.shards: list[_Shard] = []
        self.names: set[str] = set()
        self.extra_files: dict[str, bytes] = {}
        self.total_size = 0
        self.total_params = 0
        check_output(self.out, self.inputs, force)

    def __enter__(self) -> "CheckpointWriter":
        parent = self.out.parent if str(self.out.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial",
                                             dir=parent))
        except OSError as e:
            raise OutputError(f"cannot create output beside {self.out}: {e.strerror or e}") from e
        return self

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        """Append one tensor; a new shard starts when this one would pass the size limit."""
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        if name in self.names:
            raise LoraToolError(f"tensor {name!r} written twice")
        self.names.add(name)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if not self.shards or (self.shards[-1].size and
                               self.shards[-1].size + nbytes > self.max_shard_size):
            if self.shards:
                self.shards[-1].close(self.metadata)
            self.shards.append(_Shard(self.tmp, len(self.shards) + 1))
        self.shards[-1].add(name, t)
        self.total_size += nbytes
        self.total_params += t.numel()

    def add_file(self, name: str, content: bytes | str) -> None:
        """A small non-weight file (config, model card …) written with the output."""
        self.extra_files[name] = content.encode("utf-8") if isinstance(content, str) else content

    def _finish(self) -> None:
        assert self.tmp is not None
        if not self.shards:
            self.shards.append(_Shard(self.tmp, 1))  # an empty checkpoint is still valid
        self.shards[-1].close(self.metadata)
        stem, ext = self.filename.rsplit(".", 1)
        if len(self.shards) == 1:
            self.shards[0].path.rename(self.tmp / self.filename)
        else:
            n = len(self.shards)
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(self.shards, 1):
                fname = f"{stem}-{i:05d}-of-{n:05d}.{ext}"
                shard.path.rename(self.tmp / fname)
                weight_map.update(dict.fromkeys(shard.header, fname))
            index = {"metadata": {"total_size": self.total_size,
                                  "total_parameters": self.total_params},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / f"{self.filename}.index.json").write_text(json.dumps(index, indent=2)
                                                                  + "\n")
        if self.copy_from is not None and self.copy_from.is_dir():
            skip = weight_file_names(self.copy_from) | NOT_COPIED
            for entry in sorted(os.listdir(self.copy_from)):
                src = self.copy_from / entry
                if entry in skip or entry.startswith(".") or not src.is_file():
                    continue
                shutil.copyfile(src, self.tmp / entry)  # follows Hub-cache symlinks
        for name, content in self.extra_files.items():
            (self.tmp / name).write_bytes(content)
        if self.single_file:
            if os.path.isdir(self.out) and not os.path.islink(self.out):
                shutil.rmtree(self.out)  # --force replacing a folder with a file
            os.replace(self.tmp / self.filename, self.out)  # atomic for a file
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
            return
        self._move_into_place()

    def _move_into_place(self) -> None:
        assert self.tmp is not None
        old: Path | None = None
        if os.path.lexists(self.out):  # --force: swap, then delete the old one
            check_output(self.out, self.inputs, True)
            old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self.tmp = None
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()

    def abort(self) -> None:
        """Remove everything written so far."""
        for shard in self.shards:
            if not shard.f.closed:
                shard.f.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self._finish()
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.out}: {e.strerror or e}") from e
        except BaseException:
            self.abort()
            raise
