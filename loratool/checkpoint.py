"""Read any checkpoint lazily, tensor by tensor.

One entry point, :func:`open_checkpoint`, opens a ``.safetensors`` file, a model or adapter
folder (single file or sharded with an ``*.index.json``), a PyTorch ``.bin``/``.pt`` file or
sharded folder, or a Hub id. Names, dtypes, shapes and byte sizes come from the headers alone
(safetensors headers are parsed here, in plain Python, so listing never imports torch); tensor
data is read one tensor at a time with ``pread``-style reads, so memory stays near one tensor
whatever the checkpoint's size.

Example::

    ckpt = open_checkpoint("path/to/model")
    for info in ckpt.infos():
        w = ckpt.load(info.name, dtype=torch.float32)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import FormatError, InputError, UnsafeFileError, os_input_error
from .tensorfile import (NOT_WEIGHTS, REMOTE, TensorInfo, dtype_code, parse_safetensors_header,
                         read_safetensors_header, read_tensor_bytes, sniff, tensor_bytes,
                         torch_dtype)
from .validate import ADAPTER_CONFIG as ADAPTER_CONFIG_FIELDS
from .validate import MODEL_CONFIG, check_fields, check_zip, parse_json
from .paths import check_exists, check_regular, containment_root, member, resolve_inside
from .sources import choose_weights

if TYPE_CHECKING:  # torch is imported lazily: header-only work must not pay for it
    import torch

ADAPTER_CONFIG = "adapter_config.json"




# --------------------------------------------------------------------------- PyTorch pickles


def _torch_load(path: Path) -> dict[str, "torch.Tensor"]:
    """Load a ``.bin``/``.pt`` state dict with ``weights_only=True``: pickled code never runs."""
    import pickle

    import torch

    def load(mmap: bool) -> Any:
        import warnings

        with warnings.catch_warnings():  # torch warns about pickle protocols it reads fine
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)  # zip checkpoints map lazily: memory stays near one tensor
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            obj = load(False)  # legacy (pre-1.6) format cannot be mapped
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise FormatError(f"{path}: not a readable PyTorch checkpoint "
                              f"({str(e).splitlines()[0]})") from e
        raise UnsafeFileError(
            f"{path}: refused to load: it holds pickled objects other than tensors, and "
            "loading them would run code from the file. Convert it to safetensors with a "
            "tool you trust, or get a safetensors copy") from e
    except OSError as e:
        raise os_input_error(path, e) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})"
                          ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- folders


def _read_json(path: Path) -> Any:
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
    config: dict[str, Any] | None = None  # config.json
    adapter_config: dict[str, Any] | None = None  # adapter_config.json
    source: str = ""  # what the user typed (a path or a Hub id)
    _pickles: dict[Path, dict[str, Any]] = field(default_factory=dict, repr=False)
    gguf: Any = None  # a GGUF file's header (ggufio.GgufHeader): metadata, tensor types
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

    def load(self, name: str, device: Any = None, dtype: Any = None,
             buffer: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Read one tensor, optionally moved to ``device`` and cast to ``dtype``.

        The returned tensor owns its memory (never a view of a mapped file), so writing to it
        can never change an input. ``buffer`` (a uint8 CPU tensor at least as large) is reused
        to hold the data instead of fresh memory; the result is then a view of it.
        """
        import torch

        info = self.info(name)
        if info.offset == REMOTE:
            self._download(info.file)
            info = self.info(name)
        if self.gguf is not None:  # quantized types dequantize to float32
            from .ggufio import dequantize

            t = dequantize(read_tensor_bytes(info), info)
        elif info.offset >= 0:
            dt = torch_dtype(info.dtype)
            if info.nbytes == 0:
                t = torch.empty(info.shape, dtype=dt)
            elif buffer is not None and buffer.numel() >= info.nbytes:
                read_tensor_bytes(info, tensor_bytes(buffer))
                t = buffer[: info.nbytes].view(dt).reshape(info.shape)
            else:
                t = torch.frombuffer(read_tensor_bytes(info), dtype=dt).reshape(info.shape)
        else:
            state = self._pickles.get(info.file)
            if state is None:
                self._pickles.clear()  # keep one pickled shard mapped at a time
                state = self._pickles[info.file] = _torch_load(info.file)
            t = state[name].clone()
        if dtype is not None or device is not None:
            t = t.to(device=device, dtype=dtype)
        return t

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
        infos, _ = _open_file(local, self._pickles)
        for i in infos:
            if i.name in self.tensors:
                self.tensors[i.name] = i


def _infos_from_pickle(path: Path, state: dict[str, Any]) -> list[TensorInfo]:
    out = []
    for name, t in state.items():
        code = dtype_code(t.dtype)
        out.append(TensorInfo(name, code, tuple(t.shape), t.numel() * t.element_size(), path))
    return out



def _open_file(path: Path, pickles: dict[Path, dict[str, Any]]) -> tuple[list[TensorInfo], dict]:
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
    if kind not in ("zip", "pickle"):  # safetensors, or a damaged one: its own messages
        return read_safetensors_header(path)
    if kind == "zip":
        check_zip(path)
    state = _torch_load(path)
    pickles.clear()
    pickles[path] = state
    return _infos_from_pickle(path, state), {}


def _is_gguf(path: Path) -> bool:
    check_regular(path)
    try:
        with open(path, "rb") as f:
            return sniff(f.read(64)) == "gguf"
    except OSError as e:
        raise os_input_error(path, e) from e


def _open_gguf(file: Path, path: Path, spec: str) -> Checkpoint:
    """A GGUF model or adapter (one file): its header; tensors load dequantized."""
    from .ggufio import read_header

    header = read_header(file)
    return Checkpoint(path=path, folder=file.parent, files=[file],
                      tensors={i.name: i for i in header.infos}, source=spec, gguf=header)


def open_checkpoint(spec: str | os.PathLike[str], progress: Any = None) -> Checkpoint:
    """Open a checkpoint or adapter from a local path or a Hub id (``org/name[@rev]``).

    Only headers are read here. A local path always wins over a Hub id; from the Hub, configs
    and the index are downloaded, safetensors headers are read with ranged requests, and each
    weight file is downloaded only when one of its tensors is first loaded (with download bars
    when ``progress`` draws them).
    """
    from .sources import HubRepo, resolve_input

    target = resolve_input(str(spec), bars=bool(getattr(progress, "hub_bars", False)))
    if isinstance(target, HubRepo):
        return _open_hub(target, str(spec))
    path = target
    check_exists(path)
    pickles: dict[Path, dict[str, Any]] = {}
    if path.is_dir():
        folder = path
        rels, index = choose_weights(_local_names(path), str(path))
    elif path.name.endswith(".index.json"):
        folder, rels, index = path.parent, [], path.name
    else:
        folder, rels, index = path.parent, [path.name], None
    if path.is_dir() and len(rels) == 1:
        resolve_inside(folder / rels[0], containment_root(folder), path)
    if len(rels) == 1 and index is None and _is_gguf(folder / rels[0]):
        return _open_gguf(folder / rels[0], path, str(spec))

    root = containment_root(folder)

    def opener(rel: str) -> tuple[list[TensorInfo], dict[str, str]]:
        f = folder / rel
        check_exists(f)  # names a loop or a broken link precisely
        if f != path:  # what the user named is theirs; what a folder holds stays inside it
            resolve_inside(f, root, path)
        return _open_file(f, pickles)

    return _assemble(path, folder, rels, index, opener, str(spec), pickles, None)


def _open_hub(repo: Any, spec: str) -> Checkpoint:
    from .sources import CONFIG_PATTERNS

    folder = repo.snapshot(CONFIG_PATTERNS)  # configs, tokenizer files, the index: small
    names = repo.list_files()
    if names is None:  # offline: what the cache holds
        names = _local_names(folder)
    rels, index = choose_weights(names, spec)
    if len(rels) == 1 and rels[0].endswith(".gguf"):  # one GGUF file: downloaded whole
        return _open_gguf(repo.fetch(rels[0]), folder, spec)
    pickles: dict[Path, dict[str, Any]] = {}
    if index is not None and not (folder / index).exists():
        repo.fetch(index)

    def opener(rel: str) -> tuple[list[TensorInfo], dict[str, str]]:
        local = folder / rel
        if os.path.exists(local):
            return _open_file(local, pickles)
        if rel.endswith(".safetensors"):
            raw, n, size = repo.read_header(rel)
            infos, meta = parse_safetensors_header(raw, n, size, local)
            return [TensorInfo(i.name, i.dtype, i.shape, i.nbytes, local, REMOTE)
                    for i in infos], meta
        return _open_file(repo.fetch(rel), pickles)  # pickles have no header to peek at

    return _assemble(folder, folder, rels, index, opener, spec, pickles, repo.fetch)


def _config(path: Path, lenient: bool) -> dict[str, Any] | None:
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
            check_fields(data, ADAPTER_CONFIG_FIELDS, path)
    except (FormatError, InputError):
        if lenient:
            return None
        raise
    return data


def _assemble(path: Path, folder: Path, rels: list[str], index: str | None,
              opener: Callable[[str], tuple[list[TensorInfo], dict[str, str]]], spec: str,
              pickles: dict[Path, dict[str, Any]], fetch: Callable[[str], Path] | None
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
                      source=spec, _pickles=pickles, _fetch=fetch)



