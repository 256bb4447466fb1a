"""Write safetensors checkpoints atomically, streaming one tensor (as its bytes) at a time.

Tensors go to a temporary folder beside the target; shards are cut at a size limit and named
as transformers names them (``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json``, or a single ``model.safetensors``). Only when everything is
written is the folder renamed into place; any exception or Ctrl-C removes it, so a failed run
leaves no partial output and never touches an input.

This module needs no torch (a tensor's bytes come in; ``io.writer`` turns torch tensors into
them), so that byte-level work such as ``combine --method cat`` writes without loading it.

Example::
    with ShardWriter(Path("out"), inputs=[base], copy_from=base) as w:
        w.add_bytes("x.weight", "F32", (2, 2), bytes(16))
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, TypedDict

from ..errors import LoraToolError, OutputError
from ..headers.paths import containment_root, resolve_inside, walk_files
from ..headers.safetensors import NOT_CONFIG_SUFFIXES, dtype_bytes
from ..io.directio import SequentialWriter
from ..io.staging import Stage, output_os_error
from ..options import Options
from ..units import parse_size

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self, Unpack


DEFAULT_MAX_SHARD = 5 * 10**9  # transformers' default "5GB"
# Files of a source folder that never travel to an output: weights, model cards, VCS state.
NOT_COPIED = {"README.md", ".gitattributes", "adapter_config.json"}


class HeaderEntry(TypedDict):
    """One tensor's entry in a safetensors header."""

    dtype: str  # safetensors code: "BF16", "F32", …
    shape: list[int]
    data_offsets: list[int]  # [start, end) within the data that follows the header


class WriterOptions(TypedDict, total=False):
    """What :meth:`CheckpointWriter.file_or_folder` passes on to the writer."""

    inputs: list[Path] | None
    force: bool
    copy_from: Path | None
    metadata: dict[str, str] | None
    plan: list[tuple[str, str, tuple[int, ...]]] | None
    options: Options | None


def header_bytes(metadata: dict[str, str], header: dict[str, HeaderEntry]) -> bytes:
    raw = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it


class _Shard:
    """One shard. Streaming: data goes to a side file and the header is written at close.
    Planned (names, dtypes and shapes known up front): the header is written first and data
    goes straight after it, so every byte is written once."""

    def __init__(self, folder: Path, number: int | str, metadata: dict[str, str],
                 planned: dict[str, HeaderEntry] | None = None, direct: bool = True) -> None:
        self.path = folder / f".shard-{number}.safetensors"
        self.metadata = metadata
        self.header: dict[str, HeaderEntry] = dict(planned or {})
        self.planned = planned is not None
        self.size = 0
        self.seq: SequentialWriter | None = None
        if self.planned:
            self.data_path = None
            # front to back, past the page cache, written while the caller computes
            self.seq = SequentialWriter(self.path, direct=direct)
            raw = header_bytes(metadata, self.header)
            self.seq.write(memoryview(len(raw).to_bytes(8, "little") + raw))
        else:
            self.data_path = folder / f".shard-{number}.data"
            self.f: BinaryIO = open(self.data_path, "wb")

    def add(self, name: str, code: str, shape: list[int], view: memoryview) -> None:
        if self.planned:
            want = self.header.get(name)
            if want is None or want["data_offsets"][0] != self.size or want["dtype"] != \
                    code or want["shape"] != shape:
                raise LoraToolError(f"tensor {name!r} does not follow the planned layout")
        else:
            self.header[name] = {"dtype": code, "shape": shape,
                                 "data_offsets": [self.size, self.size + len(view)]}
        self.seq.write(view) if self.seq is not None else self.f.write(view)
        self.size += len(view)

    def add_raw(self, name: str, code: str, shape: list[int], src: Path, offset: int,
                nbytes: int) -> None:
        """Copy a tensor's bytes straight from a source file (in the kernel where it can)."""
        want = self.header.get(name)
        if not self.planned or want is None or want["data_offsets"] != [
                self.size, self.size + nbytes] or want["dtype"] != code or want["shape"] != shape:
            raise LoraToolError(f"tensor {name!r} does not follow the planned layout")
        assert self.seq is not None
        with open(src, "rb", buffering=0) as fin:
            if self.seq.copy_from(fin, offset, nbytes) != nbytes:
                raise LoraToolError(f"{src}: ended while copying tensor {name!r}")
        self.size += nbytes

    def close(self) -> None:
        if self.seq is not None:
            self.seq.close()
        else:
            self.f.close()
        if self.planned:
            end = max((v["data_offsets"][1] for v in self.header.values()), default=0)
            if self.size != end:
                raise LoraToolError(f"shard {self.path.name}: {self.size} of {end} bytes written")
            return
        assert self.data_path is not None
        raw = header_bytes(self.metadata, self.header)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self.data_path.unlink()

    def discard(self) -> None:
        """Stop writing (the temporary folder is removed after)."""
        if self.seq is not None:
            self.seq.discard()
        elif not self.f.closed:
            self.f.close()


# Files that hold the model's weights in another framework's format (an ONNX or OpenVINO
# export, TensorFlow, Flax, GGUF): beside new weights they would be stale copies of the old ones.
EXPORT_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data", ".gguf", ".h5", ".msgpack", ".tflite",
                   ".mlmodel", ".ot", ".pb", ".ckpt", ".npz")


def _st_module_folders(src: Path) -> set[str]:
    """Subfolders that sentence-transformers' modules.json names (1_Pooling, 2_Dense …): their
    files, weights included, belong to other layers of the model and travel as they are."""
    f = src / "modules.json"
    if not f.is_file():
        return set()
    try:
        data = json.loads(resolve_inside(f, containment_root(src), src).read_text(
            encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    if not isinstance(data, list):
        return set()
    return {m["path"].strip("/") for m in data if isinstance(m, dict)
            and isinstance(m.get("path"), str) and m["path"].strip("/")}


def copy_config_files(src: Path, dst: Path) -> list[str]:
    """Carry a model folder's other files into a new one: configs, tokenizer files, chat
    templates, generation config, and every subfolder (``1_Pooling/`` …). Left out, and
    returned: the weights the new ones replace, weights of the same model in other formats
    (an ``onnx/`` export, ``original/consolidated.pth``) that would contradict them, the model
    card, and hidden files."""
    if not src.is_dir():
        return []
    modules = _st_module_folders(src)
    left_out: list[str] = []
    for rel, real in walk_files(src):  # only files inside src; special files refused
        parts = rel.split("/")
        top = len(parts) == 1
        entry = parts[-1]
        if top and entry in NOT_COPIED:
            continue
        own_weights = not top and parts[0] in modules
        weights = entry.endswith(NOT_CONFIG_SUFFIXES) or entry.startswith("openvino_")
        if weights and not (own_weights and not entry.endswith(EXPORT_SUFFIXES)):
            if not top:
                left_out.append(rel)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, dst / rel)  # the content: Hub-cache links become files
    return left_out


class ShardWriter:
    """Stream tensors, as bytes, into a new checkpoint folder (or file) that appears only when
    complete (``io.writer.CheckpointWriter`` adds torch tensors).

    ``plan`` (optional): the ``(name, dtype code, shape)`` of every tensor, in the order they
    will be added; then shards are laid out up front and each byte is written once.
    """

    def __init__(self, out: Path | str, *, inputs: list[Path] | None = None, force: bool = False,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD, copy_from: Path | None = None,
                 filename: str = "model.safetensors",
                 metadata: dict[str, str] | None = None, single_file: bool = False,
                 plan: list[tuple[str, str, tuple[int, ...]]] | None = None,
                 options: Options | None = None) -> None:
        self.out = Path(os.path.abspath(out))
        self.options = options or Options()
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
        self.side_files: dict[str, _Shard] = {}  # name -> a second safetensors file, streamed
        self.not_copied: list[str] = []  # files of copy_from left out (see copy_config_files)
        # called with the finished temporary folder before it is published (verification)
        self.before_publish: Callable[[Path], None] | None = None
        self.total_size = 0
        self.total_params = 0
        self.plan = self._layout(plan) if plan is not None else None
        self.need = sum(v["data_offsets"][1] - v["data_offsets"][0] for p in self.plan
                        for v in p.values()) if self.plan else None  # bytes, for disk-full
        self.stage = Stage(self.out, self.inputs, force, file=filename if single_file else None,
                           options=self.options)

    def _layout(self, plan: list[tuple[str, str, tuple[int, ...]]]
                ) -> list[dict[str, HeaderEntry]]:
        """Cut a known tensor list into shards exactly as streaming would."""
        shards: list[dict[str, HeaderEntry]] = []
        size = 0
        for name, code, shape in plan:
            n = dtype_bytes(code)
            for d in shape:
                n *= d
            if not shards or (size and size + n > self.max_shard_size):
                shards.append({})
                size = 0
            shards[-1][name] = {"dtype": code, "shape": list(shape),
                                "data_offsets": [size, size + n]}
            size += n
        return shards

    def __enter__(self) -> Self:
        self.stage.__enter__()
        self.tmp = self.stage.tmp
        return self

    @classmethod
    def file_or_folder(cls, out: Path, default_name: str, **kw: Unpack[WriterOptions]
                       ) -> tuple[Self, Path]:
        """One unsharded file: ``out`` itself when it ends like ``default_name`` (e.g.
        ``.safetensors``), else ``out/default_name``. Returns the writer and the file's path."""
        if out.suffix == Path(default_name).suffix:
            return cls(out, single_file=True, **kw), out
        return cls(out, filename=default_name, max_shard_size=1 << 62, **kw), out / default_name

    def _os(self, e: OSError) -> OutputError:
        return output_os_error(self.out, e, self.need)

    def add_bytes(self, name: str, code: str, shape: tuple[int, ...],
                  data: bytes | bytearray | memoryview) -> None:
        """Append one tensor given as its bytes (``code``: its safetensors dtype); a new shard
        starts when this one would pass the size limit."""
        try:
            self._add(name, code, list(shape), memoryview(data).cast("B"))
        except OSError as e:
            raise self._os(e) from e

    def _add(self, name: str, code: str, shape: list[int], view: memoryview) -> None:
        assert self.tmp is not None, "use the writer as a context manager"
        if name in self.names:
            raise LoraToolError(f"tensor {name!r} written twice")
        if len(view) != math.prod(shape) * dtype_bytes(code):
            raise LoraToolError(f"tensor {name!r}: {len(view)} bytes for {shape} {code}")
        self.names.add(name)
        nbytes = len(view)
        if self.plan is not None:
            self._shard_for(name)
        elif not self.shards or (self.shards[-1].size and
                                 self.shards[-1].size + nbytes > self.max_shard_size):
            if self.shards:
                self.shards[-1].close()
            self.shards.append(_Shard(self.tmp, f"{len(self.shards) + 1:05d}", self.metadata))
        self.shards[-1].add(name, code, shape, view)
        self.total_size += nbytes
        self.total_params += math.prod(shape)

    def add_raw(self, name: str, code: str, shape: tuple[int, ...], src: Path, offset: int,
                nbytes: int) -> None:
        """Copy an unchanged tensor byte for byte from a safetensors source (planned mode)."""
        assert self.tmp is not None and self.plan is not None, "add_raw needs a planned layout"
        if name in self.names:
            raise LoraToolError(f"tensor {name!r} written twice")
        self.names.add(name)
        try:
            self._shard_for(name)
            self.shards[-1].add_raw(name, code, list(shape), src, offset, nbytes)
        except OSError as e:
            raise self._os(e) from e
        self.total_size += nbytes
        self.total_params += nbytes // dtype_bytes(code)

    def _shard_for(self, name: str) -> None:
        """Planned mode: open the shard that holds ``name`` (closing the previous one)."""
        assert self.plan is not None and self.tmp is not None
        if not self.shards or name not in self.shards[-1].header:
            if self.shards:
                self.shards[-1].close()
            k = len(self.shards)
            if k >= len(self.plan) or name not in self.plan[k]:
                raise LoraToolError(f"tensor {name!r} does not follow the planned layout")
            self.shards.append(_Shard(self.tmp, f"{k + 1:05d}", self.metadata, self.plan[k],
                                      self.options.direct_io))

    def add_side_bytes(self, filename: str, name: str, code: str, shape: tuple[int, ...],
                       data: bytes | bytearray | memoryview) -> None:
        """Stream a tensor into a second safetensors file of the output (``filename``), such as
        the record unmerge needs; it appears only when it receives a tensor."""
        assert self.tmp is not None, "use the writer as a context manager"
        side = self.side_files.get(filename)
        if side is None:
            side = self.side_files[filename] = _Shard(self.tmp, f"side-{len(self.side_files)}",
                                                      {"format": "pt"})
        if name in side.header:
            raise LoraToolError(f"tensor {name!r} written twice to {filename}")
        try:
            side.add(name, code, list(shape), memoryview(data).cast("B"))
        except OSError as e:
            raise self._os(e) from e

    def add_file(self, name: str, content: bytes | str) -> None:
        """A small non-weight file (config, model card …) written with the output."""
        self.extra_files[name] = content.encode("utf-8") if isinstance(content, str) else content

    def _finish(self) -> None:
        assert self.tmp is not None
        if self.plan is not None and (len(self.shards) != len(self.plan) or sum(
                len(p) for p in self.plan) != len(self.names)):
            raise LoraToolError("fewer tensors were written than planned")
        if not self.shards:
            self.shards.append(_Shard(self.tmp, "00001", self.metadata))  # empty is valid
        self.shards[-1].close()
        if len(self.shards) == 1:
            self.shards[0].path.rename(self.tmp / self.filename)
        else:
            stem, _, ext = self.filename.rpartition(".")
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
        for filename, side in self.side_files.items():
            side.close()
            side.path.rename(self.tmp / filename)
        if self.copy_from is not None:
            self.not_copied = copy_config_files(self.copy_from, self.tmp)
        for name, content in self.extra_files.items():
            (self.tmp / name).write_bytes(content)
        if self.before_publish is not None:
            self.before_publish(self.tmp)
        self.stage.publish()
        self.tmp = None

    def abort(self) -> None:
        """Remove everything written so far, and the parent folders this writer made."""
        for shard in [*self.shards, *self.side_files.values()]:
            shard.discard()
        self.stage.abort()
        self.tmp = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self._finish()
        except OSError as e:
            self.abort()
            raise self._os(e) from e
        except BaseException:
            self.abort()
            raise
