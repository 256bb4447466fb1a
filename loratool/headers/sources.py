"""Turn what the user typed (a local path or a Hub id) into something to read.

A local path always wins. Otherwise ``org/name`` or ``org/name@revision`` names a Hub repo,
reached through ``huggingface_hub`` (its cache, ``HF_TOKEN``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` apply). Only configs, tokenizer files and weights are ever downloaded, and
weights only when a command reads them; safetensors headers are read with ranged requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Iterator, MutableMapping, Protocol

from ..errors import HubError, InputError, os_input_error
from ..headers.safetensors import NOT_CONFIG_SUFFIXES, header_length

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)"
                    r"(?:@(?P<rev>[A-Za-z0-9_./-]+))?")


# What a command needs from a model or adapter repo besides weights: small, never code.
CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
HEADER_PROBE = 100_000  # bytes asked for first: most safetensors headers fit (as the Hub does)


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` → ``("org/name", "rev")``; None when it is not shaped like a Hub id."""
    m = HUB_ID.fullmatch(spec)  # fullmatch: a trailing newline is not part of an id
    if not m or spec.startswith((".", "/")):
        return None
    return m.group("repo"), m.group("rev")


def hub_repo_of(spec: str | None) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``spec`` names a Hub repo and not an existing local path:
    only these may appear as ``base_model`` in a model card."""
    if not spec or os.path.lexists(os.path.expanduser(spec)):
        return None
    return parse_hub_id(spec)


def resolve_input(spec: str, bars: bool = False) -> "Path | HubRepo":
    """A local path for ``spec`` when it exists, else the Hub repo it names (``bars``: draw
    download bars for it)."""

    path = Path(spec).expanduser()
    try:
        os.lstat(path)
        return path
    except FileNotFoundError:
        pass
    except OSError as e:  # a parent folder that cannot be searched, a name too long …
        raise os_input_error(path, e) from e
    if spec.endswith(NOT_CONFIG_SUFFIXES + (".json",)):
        # names a file: a Hub id never ends in .safetensors, so do not ask the network
        raise InputError(f"{spec}: no such file or folder")
    hub = parse_hub_id(spec)
    if hub is None:
        raise InputError(f"{spec}: no such file or folder (and not a Hub id like org/name)")
    return HubRepo(*hub, bars=bars)


def hub() -> ModuleType:
    """``huggingface_hub`` with the submodules used here, imported on first use: a command on
    local paths never pays for its import."""
    import huggingface_hub
    import huggingface_hub.constants  # noqa: F401  (each, once imported, an attribute)
    import huggingface_hub.errors  # noqa: F401
    import huggingface_hub.utils  # noqa: F401

    return huggingface_hub


def timeout() -> float:
    """Seconds the Hub may stay silent (connect, or between bytes) before a call fails."""
    return float(hub().constants.HF_HUB_DOWNLOAD_TIMEOUT)


@contextlib.contextmanager
def _hub_output(bars: bool) -> Iterator[None]:
    """For the duration of one of our Hub calls, and restored after (a Python caller's own
    huggingface_hub settings stay theirs): its warnings off (they would break the one-line
    error contract), its download bars drawn only when the caller's progress draws bars (a
    person at a terminal), and a timeout on every request (see :func:`_fill_timeouts`)."""
    utils = hub().utils
    was_off = utils.are_progress_bars_disabled()
    verbosity = utils.logging.get_verbosity()
    if bars and was_off and not hub().constants.HF_HUB_DISABLE_PROGRESS_BARS:
        utils.enable_progress_bars()
    elif not bars and not was_off:
        utils.disable_progress_bars()
    utils.logging.set_verbosity_error()
    client = hub().get_session()
    hooks = client.event_hooks.get("request", [])
    added = _fill_timeouts not in hooks
    if added:
        client.event_hooks = {**client.event_hooks, "request": [*hooks, _fill_timeouts]}
    try:
        yield
    finally:
        if added:
            now = client.event_hooks.get("request", [])
            client.event_hooks = {**client.event_hooks,
                                  "request": [h for h in now if h is not _fill_timeouts]}
        utils.logging.set_verbosity(verbosity)
        if was_off != utils.are_progress_bars_disabled():
            utils.disable_progress_bars() if was_off else utils.enable_progress_bars()


class _Request(Protocol):
    """An httpx request as the hook sees it: only its ``timeout`` extension is touched
    (seconds, or None, for ``connect``, ``read``, ``write`` and ``pool``)."""

    @property
    def extensions(self) -> MutableMapping[str, dict[str, float | None]]: ...


def _fill_timeouts(request: _Request) -> None:
    """huggingface_hub passes ``timeout=None`` (wait forever) on many calls, which overrides
    any client default: this request hook fills in every missing timeout, so an endpoint that
    accepts the connection and never answers is an error, not a hang (the client's transport,
    proxies included, stays as it is)."""
    limits = dict(request.extensions.get("timeout") or {})
    for key in ("connect", "read", "write", "pool"):
        if limits.get(key) is None:
            limits[key] = timeout()
    request.extensions["timeout"] = limits


def _status(e: BaseException) -> tuple[int | None, str]:
    """The HTTP status (or the timeout) behind an error huggingface_hub wrapped in another."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 8:
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is not None:
            return status, ""
        if "Timeout" in type(cause).__name__:
            return None, type(cause).__name__
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None, ""


@contextlib.contextmanager
def hub_errors(where: str, revision: str | None = None, bars: bool = False
               ) -> Iterator[None]:
    """One clear line for every way a Hub call fails; the token never appears in it."""
    hfe = hub().errors
    try:
        with _hub_output(bars):
            yield
    except hfe.HFValidationError as e:
        raise HubError(f"{where}: not a valid Hub id ({str(e).splitlines()[0][:120]})") from e
    except json.JSONDecodeError as e:  # an endpoint that is not a Hub (a proxy's page …)
        raise HubError(f"{where}: the Hub endpoint answered with something that is not JSON; "
                       "check HF_ENDPOINT (it must be a Hugging Face Hub) and retry") from e
    except hfe.GatedRepoError as e:
        raise HubError(f"{where}: gated repository; accept its terms on the Hub and set "
                       "HF_TOKEN") from e
    except hfe.RepositoryNotFoundError as e:  # after GatedRepoError, its subclass
        raise HubError(f"{where}: no such local path, and no such repository on the Hub (or it "
                       "is private and your token has no access: set HF_TOKEN or run `hf auth "
                       "login`)") from e
    except hfe.RevisionNotFoundError as e:
        raise HubError(f"{where}: revision {revision!r} not found (check the branch, tag or "
                       "commit)") from e
    except hfe.LocalEntryNotFoundError as e:
        status, slow = _status(e.__cause__ or e.__context__ or e)
        if status in (401, 403):
            raise HubError(f"{where}: no permission (HTTP {status}); set HF_TOKEN to a token "
                           "with access to this repo") from e
        if status is not None:
            raise HubError(f"{where}: the Hub answered HTTP {status}, and the file is not in "
                           "the local cache; retry later") from e
        if slow:
            raise _timeout(where, slow) from e
        raise HubError(f"{where}: no such local path; as a Hub id it is not in the local cache "
                       "and the Hub cannot be reached (offline?): connect, or unset "
                       "HF_HUB_OFFLINE") from e
    except hfe.EntryNotFoundError as e:
        raise HubError(f"{where}: file not found in the repo at this revision") from e
    except hfe.OfflineModeIsEnabled as e:
        raise HubError(f"{where}: not in the local cache and HF_HUB_OFFLINE is set") from e
    except hfe.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            raise HubError(f"{where}: no permission (HTTP {status}); use a token with write "
                           "access to this repo (HF_TOKEN or `hf auth login`)") from e
        raise HubError(f"{where}: the Hub answered HTTP {status}; retry, or check "
                       "HF_ENDPOINT and your token") from e
    except OSError as e:
        raise HubError(f"{where}: cannot reach the Hub ({type(e).__name__}); check the "
                       "network or use a local path") from e
    except RuntimeError as e:
        if "uploading" not in str(e):
            raise
        cause = e.__cause__ or e
        raise HubError(f"{where}: the upload failed ({str(cause).splitlines()[0][:200]}); "
                       "retry") from e
    except Exception as e:  # httpx errors share no base class with the above
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            if "Timeout" in type(e).__name__:
                raise _timeout(where, type(e).__name__) from e
            raise HubError(f"{where}: cannot reach the Hub ({type(e).__name__}); check the "
                           "network or use a local path") from e
        raise


def _timeout(where: str, kind: str) -> HubError:
    return HubError(f"{where}: the Hub did not answer within {timeout():g} s ({kind}); retry "
                    "later, or allow more with HF_HUB_DOWNLOAD_TIMEOUT=SECONDS")


class HubRepo:
    """A model or adapter repo on the Hub, read file by file through the local cache."""

    def __init__(self, repo: str, revision: str | None = None, bars: bool = False) -> None:
        self.repo = repo
        self.revision = revision
        self.bars = bars  # draw huggingface_hub's download bars
        self.where = f"{repo}@{revision}" if revision else repo
        self.commit: str | None = None  # pinned on the first snapshot, so files agree

    def snapshot(self, patterns: list[str]) -> Path:
        """Download the files matching ``patterns`` (cached); the snapshot folder."""
        with hub_errors(self.where, self.revision, self.bars):
            folder = Path(hub().snapshot_download(self.repo, revision=self.commit or self.revision,
                                               allow_patterns=patterns))
        self.commit = self.commit or folder.name
        return folder

    def list_files(self) -> list[str] | None:
        """All file names of the repo at this revision; None when offline."""
        if hub().constants.HF_HUB_OFFLINE:
            return None
        with hub_errors(self.where, self.revision):
            return hub().list_repo_files(self.repo, revision=self.commit or self.revision)

    def fetch(self, filename: str) -> Path:
        """Download one file (or find it in the cache); its local path."""
        with hub_errors(f"{self.where}: {filename}", self.revision, self.bars):
            return Path(hub().hf_hub_download(self.repo, filename,
                                           revision=self.commit or self.revision))

    def read_header(self, filename: str) -> tuple[bytes, int, int]:
        """A remote safetensors file's JSON header with ranged GETs: ``(raw, length, size)``."""
        hf = hub()
        url = hf.hf_hub_url(self.repo, filename, revision=self.commit or self.revision)
        headers = hf.utils.build_hf_headers()
        get_session, hf_raise_for_status = hf.get_session, hf.utils.hf_raise_for_status
        label = f"{self.where}: {filename}"
        with hub_errors(label, self.revision):
            r = get_session().get(url, headers={**headers, "Range": f"bytes=0-{HEADER_PROBE}"})
            hf_raise_for_status(r)
            body = r.content
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            size = int(total) if total.isdigit() else len(body)
            n = header_length(body[:8], size, label)
            if 8 + n > len(body):
                r = get_session().get(url, headers={**headers, "Range": f"bytes=8-{n + 7}"})
                hf_raise_for_status(r)
                body = body[:8] + r.content
        if len(body) < 8 + n:
            raise HubError(f"{label}: the Hub sent a short header ({len(body)} bytes)")
        return body[8:8 + n], n, size


# what merge writes beside a model's weights for unmerge (edits.RECORD): never the weights
SIDE_FILES = ("loratool-unmerge.safetensors", "loratool-dora-norms.safetensors")


def choose_weights(names: list[str], where: str) -> tuple[list[str], str | None]:
    """Pick the weight files among a folder's (or Hub repo's) file names, as transformers,
    diffusers and PEFT do: ``(files, None)`` or ``([], index)`` for a sharded checkpoint."""
    names = sorted(n for n in names if n not in SIDE_FILES)
    if "adapter_config.json" in names:
        for n in ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt"):
            if n in names:
                return [n], None
        raise InputError(f"{where}: has adapter_config.json but no adapter_model.safetensors "
                         "or adapter_model.bin; the adapter's weights are missing")
    # As transformers: safetensors before pickles; the standard single file before an index.
    for singles, suffixes in ((("model.safetensors", "diffusion_pytorch_model.safetensors"),
                               (".safetensors",)),
                              (("pytorch_model.bin", "diffusion_pytorch_model.bin"),
                               (".bin", ".pt", ".pth"))):
        single = next((s for s in singles if s in names), None)
        if single is not None:
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
    ggufs = [n for n in names if n.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs, None
    if ggufs:
        raise InputError(f"{where}: several GGUF files ({', '.join(ggufs[:4])}); pass the file "
                         "to use as the path")
    raise InputError(f"{where}: no weights found (expected *.safetensors, *.bin or an "
                     "*.index.json); point at a model or adapter folder")
