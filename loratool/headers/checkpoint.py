"""Open any checkpoint from its headers: what it holds, without reading tensor data.

:func:`open_checkpoint` opens a ``.safetensors`` file, a model or adapter folder (single file
or sharded with an ``*.index.json``), a GGUF file, a PyTorch ``.bin``/``.pt`` file or sharded
folder, or a Hub id. Names, dtypes, shapes and byte sizes come from the headers, parsed here
in plain Python, so listing never imports torch. Tensor data is read by a
:class:`TensorSource` the caller passes in (``loratool.io.tensors`` gives the one that reads
into torch tensors, one tensor at a time); without one only what the headers say is known,
and PyTorch pickles, which have no header, cannot be listed.

Example::
    ckpt = open_checkpoint("path/to/model")           # headers only
    sorted(ckpt.tensors)[:3], ckpt.total_params
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from ..errors import FormatError, InputError, os_input_error
from ..progress import SILENT, Progress
from .checks import ADAPTER_CONFIG as ADAPTER_CONFIG_FIELDS
from .checks import ADAPTER_CONFIG_ANY, MODEL_CONFIG, check_fields, check_zip, parse_json
from .gguf import GgufHeader, read_header
from .paths import check_exists, check_regular, containment_root, member, resolve_inside
from .safetensors import (
    NOT_WEIGHTS,
    REMOTE,
    TensorInfo,
    parse_safetensors_header,
    read_safetensors_header,
    sniff,
)
from .sources import CONFIG_PATTERNS, HubRepo, choose_weights, resolve_input

if TYPE_CHECKING:  # only for annotations: this package never imports torch
    import torch


ADAPTER_CONFIG = "adapter_config.json"
Opener = Callable[[str], tuple[list[TensorInfo], dict[str, str]]]


class TensorSource(Protocol):
    """What reads tensor data for a :class:`Checkpoint` (``loratool.io.tensors.TorchSource``):
    the header layer lists, a source loads."""

    def list_pickle(self, path: Path) -> list[TensorInfo]:
        """The tensors of a PyTorch ``.bin``/``.pt`` file (which has no header to read)."""

    def load(self, ckpt: Checkpoint, info: TensorInfo, device: torch.device | str | None,
             dtype: torch.dtype | None, buffer: torch.Tensor | None) -> torch.Tensor:
        """One tensor's data."""


class PickleNeedsTorch(FormatError):
    """A PyTorch pickle where only headers are read: listing its tensors needs torch."""


# --------------------------------------------------------------------------- folders


def _read_json(path: Path) -> object:
    check_regular(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise os_input_error(path, e) from e
    return parse_json(raw, path)


def _local_names(folder: Path) -> list[str]:
    try:
        return [n for n in os.listdir(folder)
                if (folder / n).is_file() or (folder / n).is_symlink()]
    except OSError as e:
        raise os_input_error(folder, e) from e


# --------------------------------------------------------------------------- the checkpoint


@dataclass
class Checkpoint:
    """A checkpoint opened lazily: headers are read, tensor data is read on :meth:`load`."""

    path: Path  # the file or folder that was opened
    folder: Path  # where config.json and the other non-weight files live
    files: list[Path]
    tensors: dict[str, TensorInfo]
    index: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, object] | None = None  # config.json
    adapter_config: dict[str, object] | None = None  # adapter_config.json
    source: str = ""  # what the user typed (a path or a Hub id)
    gguf: GgufHeader | None = None  # a GGUF file's header: metadata, tensor types
    # reads tensor data (None: headers only, as inspect opens a checkpoint)
    reader: TensorSource | None = field(default=None, repr=False)
    # For a Hub checkpoint: downloads one file (path relative to ``folder``) on first use.
    _fetch: Callable[[str], Path] | None = field(default=None, repr=False)

    @property
    def container(self) -> str:
        """``safetensors``, ``pytorch`` or ``gguf``: how the tensors are stored."""
        if self.gguf is not None:
            return "gguf"
        return "safetensors" if all(f.suffix == ".safetensors" for f in self.files) else "pytorch"

    @property
    def total_params(self) -> int:
        return sum(i.params for i in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def infos(self) -> Iterator[TensorInfo]:
        """Tensor infos in file order."""
        return iter(self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        """The info of one tensor; a clear error if the name is absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.source or self.path}: has no tensor {name!r}") from None

    def load(self, name: str, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, buffer: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Read one tensor, optionally moved to ``device`` and cast to ``dtype``.

        The returned tensor owns its memory (never a view of a mapped file), so writing to it
        can never change an input. ``buffer`` (a uint8 CPU tensor at least as large) is reused
        to hold the data instead of fresh memory; the result is then a view of it.
        """
        if self.reader is None:
            raise FormatError(f"{self.source or self.path}: opened for its headers only; open "
                              "it with loratool.io.tensors.open_checkpoint to read tensors")
        return self.reader.load(self, self.local_info(name), device, dtype, buffer)

    def local_info(self, name: str) -> TensorInfo:
        """The info of a tensor whose file is on disk (downloading a Hub shard if needed)."""
        info = self.info(name)
        if info.offset == REMOTE:
            self._download(info.file)
            info = self.info(name)
        return info

    def extra_file(self, rel: str) -> Path | None:
        """A file beside the weights (a record, a config), downloaded from the Hub if needed;
        None when there is no such file."""
        local = self.folder / rel
        if local.is_file():
            resolve_inside(local, containment_root(self.folder))
            return local
        if self._fetch is None:
            return None
        return self._fetch(rel)

    def _download(self, file: Path) -> None:
        """Fetch a Hub shard whose header was read remotely, and re-read it locally."""
        assert self._fetch is not None
        local = self._fetch(file.relative_to(self.folder).as_posix())
        infos, _ = _open_file(local, self.reader)
        for i in infos:
            if i.name in self.tensors:
                self.tensors[i.name] = i


def _open_file(path: Path, reader: TensorSource | None
               ) -> tuple[list[TensorInfo], dict[str, str]]:
    check_regular(path)
    try:
        with open(path, "rb") as f:  # detect by content, not by name
            head = f.read(64)
    except OSError as e:
        raise os_input_error(path, e) from e
    kind = sniff(head)
    if kind == "gguf":  # only ever a checkpoint of its own (see open_checkpoint)
        raise FormatError(f"{path}: a GGUF file among other weights; pass it on its own")
    if kind in ("json", "text") or (kind == "unknown" and path.suffix != ".safetensors"
                                            and len(head) >= 8):
        raise FormatError(f"{path}: {NOT_WEIGHTS[kind]}")
    # safetensors, or a damaged one (a .safetensors file whose first bytes happen to look like
    # a pickle's, as a header length of 0x80… does, too: torch would hand it to safetensors'
    # own reader, whose errors are not ours): its own messages
    if kind not in ("zip", "pickle") or path.suffix == ".safetensors":
        return read_safetensors_header(path)
    if kind == "zip":
        check_zip(path)
    if reader is None:
        raise PickleNeedsTorch(f"{path}: a PyTorch pickle, which has no header: listing its "
                               "tensors needs torch")
    return reader.list_pickle(path), {}


def is_gguf(path: Path) -> bool:
    """A file that starts as GGUF does (the suffix is not trusted)."""
    check_regular(path)
    try:
        with open(path, "rb") as f:
            return sniff(f.read(64)) == "gguf"
    except OSError as e:
        raise os_input_error(path, e) from e


def _open_gguf(file: Path, path: Path, spec: str, reader: TensorSource | None) -> Checkpoint:
    """A GGUF model or adapter (one file): its header; tensors load dequantized."""
    header = read_header(file)
    return Checkpoint(path=path, folder=file.parent, files=[file],
                      tensors={i.name: i for i in header.infos}, source=spec, gguf=header,
                      reader=reader)


def open_checkpoint(spec: str | os.PathLike[str], progress: Progress = SILENT,
                    reader: TensorSource | None = None) -> Checkpoint:
    """Open a checkpoint or adapter from a local path or a Hub id (``org/name[@rev]``).

    Only headers are read here (``reader`` reads tensor data later, and lists pickles). A local
    path always wins over a Hub id; from the Hub, configs and the index are downloaded,
    safetensors headers are read with ranged requests, and each weight file is downloaded
    only when one of its tensors is first loaded (with download bars when ``progress`` draws
    them).
    """
    target = resolve_input(str(spec), bars=progress.hub_bars)
    if isinstance(target, HubRepo):
        progress.clear()  # the Hub's own bars take the line
        return _open_hub(target, str(spec), reader)
    path = target
    check_exists(path)
    if path.is_dir():
        folder = path
        rels, index = choose_weights(_local_names(path), str(path))
    elif path.name.endswith(".index.json"):
        folder, rels, index = path.parent, [], path.name
    else:
        folder, rels, index = path.parent, [path.name], None
    if path.is_dir() and len(rels) == 1:
        resolve_inside(folder / rels[0], containment_root(folder), path)
    if len(rels) == 1 and index is None and is_gguf(folder / rels[0]):
        return _open_gguf(folder / rels[0], path, str(spec), reader)
    root = containment_root(folder)

    def opener(rel: str) -> tuple[list[TensorInfo], dict[str, str]]:
        f = folder / rel
        check_exists(f)  # names a loop or a broken link precisely
        if f != path:  # what the user named is theirs; what a folder holds stays inside it
            resolve_inside(f, root, path)
        return _open_file(f, reader)

    return _assemble(path, folder, rels, index, opener, str(spec), reader, None)


def _open_hub(repo: HubRepo, spec: str, reader: TensorSource | None) -> Checkpoint:
    folder = repo.snapshot(CONFIG_PATTERNS)  # configs, tokenizer files, the index: small
    names = repo.list_files()
    if names is None:  # offline: what the cache holds
        names = _local_names(folder)
    rels, index = choose_weights(names, spec)
    if len(rels) == 1 and rels[0].endswith(".gguf"):  # one GGUF file: downloaded whole
        return _open_gguf(repo.fetch(rels[0]), folder, spec, reader)
    if index is not None and not (folder / index).exists():
        repo.fetch(index)

    def opener(rel: str) -> tuple[list[TensorInfo], dict[str, str]]:
        local = folder / rel
        if os.path.exists(local):
            return _open_file(local, reader)
        if rel.endswith(".safetensors"):
            raw, n, size = repo.read_header(rel)
            infos, meta = parse_safetensors_header(raw, n, size, local)
            return [TensorInfo(i.name, i.dtype, i.shape, i.nbytes, local, REMOTE)
                    for i in infos], meta
        return _open_file(repo.fetch(rel), reader)  # pickles have no header to peek at

    return _assemble(folder, folder, rels, index, opener, spec, reader, repo.fetch)


def _config(path: Path, lenient: bool) -> dict[str, object] | None:
    """A JSON config beside the weights; for a single file named directly, a broken config in
    its folder is not the user's input, so it is ignored rather than fatal."""
    if not os.path.lexists(path):
        return None
    try:
        resolve_inside(path, containment_root(path.parent))
        data = _read_json(path)
        if not isinstance(data, dict):
            raise FormatError(f"{path}: holds a JSON {type(data).__name__}, not an object of "
                              "settings")
        if path.name == "config.json":
            check_fields(data, MODEL_CONFIG, path)
        elif path.name == ADAPTER_CONFIG:
            lora = data.get("peft_type", "LORA") == "LORA"
            check_fields(data, ADAPTER_CONFIG_FIELDS if lora else ADAPTER_CONFIG_ANY, path)
    except (FormatError, InputError):
        if lenient:
            return None
        raise
    return data


def _assemble(path: Path, folder: Path, rels: list[str], index: str | None, opener: Opener,
              spec: str, reader: TensorSource | None, fetch: Callable[[str], Path] | None
              ) -> Checkpoint:
    """Read the headers of the chosen files (or of an index's shards) into one Checkpoint."""
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    wmap: dict[str, str] = {}
    index_path = folder / index if index else None
    if index_path is not None:
        data = _read_json(index_path)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise FormatError(f"{index_path}: has no weight_map of tensor names to files")
        for v in set(wmap.values()):
            member(folder, v, index_path)
        rels = list(dict.fromkeys(wmap.values()))
    for rel in rels:
        infos, meta = opener(rel)
        metadata = metadata or meta
        for i in infos:
            # with an index, the index decides which shard a tensor is read from
            if not wmap or wmap.get(i.name) == rel:
                tensors[i.name] = i
    for name, rel in wmap.items():
        if name not in tensors:
            raise FormatError(f"{index_path}: names tensor {name!r} in {rel}, which lacks it; "
                              "the index and the shards do not match")
    if wmap:  # file order: shard by shard, then by position in the shard
        order = {folder / r: k for k, r in enumerate(rels)}
        tensors = dict(sorted(tensors.items(),
                              key=lambda kv: (order.get(kv[1].file, 0), kv[1].offset)))
    single_file = path.is_file() and index is None
    config = _config(folder / "config.json", lenient=single_file)
    adapter_config = _config(folder / ADAPTER_CONFIG, lenient=single_file)
    if single_file and adapter_config is not None and not any(
            p in n for n in tensors for p in (".lora_", "lora_A", "lora_B")):
        adapter_config = None  # a model file that happens to sit beside an adapter
    return Checkpoint(path=path, folder=folder, files=[folder / r for r in rels],
                      tensors=tensors, index=index_path, metadata=metadata,
                      config=config, adapter_config=adapter_config,
                      source=spec, reader=reader, _fetch=fetch)
