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

import errno
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import FormatError, InputError, UnsafeFileError
from .validate import ADAPTER_CONFIG as ADAPTER_CONFIG_FIELDS
from .validate import MODEL_CONFIG, check_fields, check_zip, parse_json

if sys.byteorder != "little":  # safetensors data is little-endian; so is every host we know
    raise ImportError("loratool reads and writes safetensors data as little-endian, the "
                      "byte order of this machine is not")

if TYPE_CHECKING:  # torch is imported lazily: header-only work must not pay for it
    import torch

# safetensors dtype code -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "C64": (8, "complex64"),
}
TORCH_TO_CODE: dict[str, str] = {name: code for code, (_, name) in DTYPES.items()}

# safetensors refuses headers above 100 MB; a larger length field means a damaged file
MAX_HEADER_BYTES = 100_000_000
MAX_TENSORS = 1 << 18  # tensors in one file: real checkpoints hold thousands at most
MAX_DIM = 1 << 48  # one dimension: beyond any real tensor (and what torch can index)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"
REMOTE = -2  # TensorInfo.offset of a tensor whose file is still on the Hub


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: no data is read to build this."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", …
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file; -1 otherwise

    @property
    def params(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def natural_key(s: str) -> list[tuple[int, Any]]:
    """Sort key that puts ``layers.10`` after ``layers.9``."""
    return [(1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"(\d+)", s)]


def dtype_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return DTYPES[code][0]


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype for a safetensors dtype code."""
    import torch

    dt = getattr(torch, DTYPES[code][1], None)
    if dt is None:
        raise FormatError(f"dtype {code} is not supported by torch {torch.__version__}; "
                          "upgrade torch to read this tensor")
    return dt


def dtype_code(dtype: "torch.dtype") -> str:
    """The safetensors dtype code for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_TO_CODE:
        raise FormatError(f"tensors of dtype {name} cannot be stored in safetensors")
    return TORCH_TO_CODE[name]


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check a local safetensors header; tensor infos (file order) and metadata.

    Every check that the safetensors library makes is made here too, with a message that
    names the file and the tensor, so that a damaged file fails before anything is written.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = _header_length(head, size, path)
            raw = f.read(n)
    except OSError as e:
        raise _os_error(path, e) from e
    return parse_safetensors_header(raw, n, size, path)


def _header_length(head: bytes, size: int, path: Path | str) -> int:
    if len(head) < 8:
        raise FormatError(f"{path}: file is {size} bytes, too short to be safetensors "
                          "(truncated download? fetch it again)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise FormatError(f"{path}: header length {n} is larger than the file "
                          f"({size} bytes): the file is truncated or not safetensors")
    return n


def parse_safetensors_header(raw: bytes, n: int, size: int, path: Path
                             ) -> tuple[list[TensorInfo], dict[str, str]]:
    """Check the JSON header ``raw`` (``n`` bytes) of a safetensors file of ``size`` bytes."""
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # before parsing: memory stays bounded
        raise FormatError(f"{path}: the header lists more than {MAX_TENSORS:,} tensors, far "
                          "beyond any real checkpoint: the file is damaged or hostile")
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + n
    data_len = size - base
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise FormatError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets")
        code, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {code!r} "
                              f"(known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= 16
                and all(type(d) is int and 0 <= d < MAX_DIM for d in shape)):
            raise FormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise FormatError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        nbytes = offs[1] - offs[0]
        want = math.prod(shape) * DTYPES[code][0]
        if nbytes != want:
            raise FormatError(f"{path}: tensor {name!r} shape {shape} of {code} needs {want} "
                              f"bytes but its data_offsets hold {nbytes}: the header is damaged")
        if offs[1] > data_len:
            raise FormatError(f"{path}: tensor {name!r} data ends at byte {base + offs[1]} but "
                              f"the file has {size}: the file is truncated (fetch it again)")
        infos.append(TensorInfo(name, code, tuple(shape), nbytes, path, base + offs[0]))
    # As the safetensors library requires: the tensors' data tile the buffer exactly, with no
    # overlap (two tensors sharing bytes), no gap and nothing after the last one.
    pos, prev = 0, None
    for start, end, name in sorted((i.offset - base, i.offset - base + i.nbytes, i.name)
                                   for i in infos):
        if start < pos:
            raise FormatError(f"{path}: tensors {prev!r} and {name!r} overlap in the file: "
                              "the header is damaged")
        if start > pos:
            raise FormatError(f"{path}: {start - pos} bytes before tensor {name!r} belong to no "
                              "tensor: the header is damaged")
        pos, prev = end, name
    if pos != data_len:
        raise FormatError(f"{path}: {data_len - pos} bytes after the last tensor belong to no "
                          "tensor: the file is damaged or was appended to")
    return infos, dict(meta)


def _read_exact(info: TensorInfo, into: memoryview | None = None) -> bytearray | memoryview:
    """Read one tensor's bytes with a positioned read (no mmap: RSS stays near one tensor),
    into a new buffer or into ``into`` (a caller's reused buffer: fresh memory costs a page
    fault per 4 KiB, which on some machines is slower than the read itself)."""
    buf = bytearray(info.nbytes) if into is None else into[: info.nbytes]
    view = memoryview(buf)
    try:
        with open(info.file, "rb", buffering=0) as f:
            done = 0
            while done < info.nbytes:
                got = _pread_into(f, view[done:], info.offset + done)
                if got == 0:
                    raise FormatError(f"{info.file}: ended while reading tensor {info.name!r}: "
                                      "the file is truncated or changed while being read")
                done += got
    except OSError as e:
        raise _os_error(info.file, e) from e
    return buf


def _pread_into(f: Any, view: memoryview, offset: int) -> int:
    """Read at an offset into ``view``: ``preadv`` (Linux, BSD) straight into the buffer,
    ``pread`` (macOS) with one copy, or seek and read where neither exists (Windows)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], offset)
    if hasattr(os, "pread"):
        chunk = os.pread(f.fileno(), min(len(view), 1 << 26), offset)
        view[: len(chunk)] = chunk
        return len(chunk)
    f.seek(offset)
    return f.readinto(view) or 0


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
        raise _os_error(path, e) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})"
                          ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- folders


def _os_error(path: Path, e: OSError) -> InputError:
    if e.errno == errno.ELOOP:
        return InputError(f"{path}: symlink loop; point the path at a real file or folder")
    if e.errno in (errno.EACCES, errno.EPERM):
        return InputError(f"{path}: permission denied; make it readable (chmod +r) and retry")
    if e.errno == errno.ENOENT:
        return InputError(f"{path}: no such file or folder")
    if e.errno == errno.EISDIR:
        return InputError(f"{path}: is a folder where a file was expected")
    return InputError(f"{path}: cannot read ({e.strerror or e})")


def check_exists(path: Path) -> None:
    """Raise a clear error for a missing path, a broken link or a symlink loop."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise InputError(f"{path}: broken symlink (its target does not exist)") from e
        raise _os_error(path, e) from e


def check_regular(path: Path) -> None:
    """Only regular files are read: opening a FIFO or a device would block or never end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise _os_error(path, e) from e
    if not stat.S_ISREG(mode):
        what = "a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(
            mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file"
        raise InputError(f"{path}: is {what}, not a regular file; point at the weights file")


def _safe_member(folder: Path, rel: str, index: Path) -> Path:
    """A file named by an index must stay inside the folder: no absolute paths, no ``..``."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise FormatError(f"{index}: names file {rel!r} outside its folder; refusing to read it")
    return folder / p


def _read_json(path: Path) -> Any:
    check_regular(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _os_error(path, e) from e
    return parse_json(raw, path)


def choose_weights(names: list[str], where: str) -> tuple[list[str], str | None]:
    """Pick the weight files among a folder's (or Hub repo's) file names, as transformers and
    PEFT do: ``(files, None)`` or ``([], index)`` for a sharded checkpoint."""
    names = sorted(names)
    if ADAPTER_CONFIG in names:
        for n in ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt"):
            if n in names:
                return [n], None
        raise InputError(f"{where}: has {ADAPTER_CONFIG} but no adapter_model.safetensors "
                         "or adapter_model.bin; the adapter's weights are missing")
    # As transformers: safetensors before pickles; the standard single file before an index.
    for single, suffixes in (("model.safetensors", (".safetensors",)),
                             ("pytorch_model.bin", (".bin", ".pt", ".pth"))):
        if single in names:
            return [single], None
        index_suffixes = tuple(s + ".index.json" for s in suffixes)
        idx = [n for n in names if n.endswith(index_suffixes)]
        if len(idx) > 1 and "model" + index_suffixes[0] in idx:
            idx = ["model" + index_suffixes[0]]
        if len(idx) == 1:
            return [], idx[0]
        if len(idx) > 1:
            raise InputError(f"{where}: several index files ({', '.join(idx)}); "
                             "pass the one to use as the path")
        found = [n for n in names if n.endswith(suffixes)]
        if len(found) == 1:
            return found, None
        if found:
            raise InputError(f"{where}: several weight files and no index ({', '.join(found)}); "
                             "pass the file to use as the path")
    idx = [n for n in names if n.endswith(".index.json")]
    if len(idx) == 1:
        return [], idx[0]
    raise InputError(f"{where}: no weights found (expected *.safetensors, *.bin or an "
                     "*.index.json); point at a model or adapter folder")


def _local_names(folder: Path) -> list[str]:
    try:
        return [n for n in os.listdir(folder)
                if (folder / n).is_file() or (folder / n).is_symlink()]
    except OSError as e:
        raise _os_error(folder, e) from e


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
    # For a Hub checkpoint: downloads one file (path relative to ``folder``) on first use.
    _fetch: Callable[[str], Path] | None = field(default=None, repr=False)

    @property
    def container(self) -> str:
        """``safetensors`` or ``pytorch``: how the tensors are stored."""
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
        if info.offset >= 0:
            dt = torch_dtype(info.dtype)
            if info.nbytes == 0:
                t = torch.empty(info.shape, dtype=dt)
            elif buffer is not None and buffer.numel() >= info.nbytes:
                from .writer import tensor_bytes

                _read_exact(info, tensor_bytes(buffer))
                t = buffer[: info.nbytes].view(dt).reshape(info.shape)
            else:
                t = torch.frombuffer(_read_exact(info), dtype=dt).reshape(info.shape)
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


def sniff(head: bytes) -> str:
    """What a file's first bytes say it is: ``safetensors``, ``zip`` (a PyTorch checkpoint),
    ``pickle``, ``gguf``, ``json``, ``text`` or ``unknown``."""
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) > 8 and head[8:9] == b"{":  # before the pickle test: a length may start 0x80
        return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "json"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        decoded = ""
    if decoded and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        return "text"
    return "unknown"


_NOT_WEIGHTS = {
    "gguf": "a GGUF file (llama.cpp): loratool writes GGUF adapters but does not read GGUF; "
            "point at the safetensors model or adapter it was made from",
    "json": "a JSON file, not weights: point at the folder that holds it and the weights",
    "text": "a text file, not weights: point at a .safetensors, .bin or model folder",
    "unknown": "not a checkpoint loratool reads (safetensors, or a PyTorch .bin/.pt); is it "
               "complete, and the file you meant?",
}


def _open_file(path: Path, pickles: dict[Path, dict[str, Any]]) -> tuple[list[TensorInfo], dict]:
    check_regular(path)
    try:
        with open(path, "rb") as f:  # detect by content, not by name
            head = f.read(64)
    except OSError as e:
        raise _os_error(path, e) from e
    kind = sniff(head)
    if kind in ("gguf", "json", "text") or (kind == "unknown" and path.suffix != ".safetensors"
                                            and len(head) >= 8):
        raise FormatError(f"{path}: {_NOT_WEIGHTS[kind]}")
    if kind not in ("zip", "pickle"):  # safetensors, or a damaged one: its own messages
        return read_safetensors_header(path)
    if kind == "zip":
        check_zip(path)
    state = _torch_load(path)
    pickles.clear()
    pickles[path] = state
    return _infos_from_pickle(path, state), {}


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

    def opener(rel: str) -> tuple[list[TensorInfo], dict[str, str]]:
        f = folder / rel
        check_exists(f)  # names a loop or a broken link precisely
        return _open_file(f, pickles)

    return _assemble(path, folder, rels, index, opener, str(spec), pickles, None)


def _open_hub(repo: Any, spec: str) -> Checkpoint:
    from .sources import CONFIG_PATTERNS

    folder = repo.snapshot(CONFIG_PATTERNS)  # configs, tokenizer files, the index: small
    names = repo.list_files()
    if names is None:  # offline: what the cache holds
        names = _local_names(folder)
    rels, index = choose_weights(names, spec)
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
        for v in wmap.values():
            _safe_member(folder, v, index_path)
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


# Weights of any framework: never copied beside new weights (they would contradict them).
NOT_CONFIG_SUFFIXES = WEIGHT_SUFFIXES + (".index.json", ".gguf", ".ckpt", ".h5", ".msgpack",
                                         ".onnx", ".onnx_data", ".onnx.data", ".npz", ".pb",
                                         ".tflite", ".ot", ".mlmodel", ".data")

