"""Turn what the user typed (a local path or a Hub id) into a local path.

A local path always wins. Otherwise ``org/name`` or ``org/name@revision`` is fetched through
``huggingface_hub`` (its cache, ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply),
downloading only configs, tokenizer files and the weights: never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HubError, InputError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
# What a command needs from a model or adapter repo: configs, tokenizer files, weights.
CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
SAFETENSORS_PATTERNS = ["*.safetensors"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` → ``("org/name", "rev")``; None when it is not shaped like a Hub id."""
    m = HUB_ID.match(spec)
    if not m or spec.startswith((".", "/")):
        return None
    return m.group("repo"), m.group("rev")


def resolve_input(spec: str, allow_patterns: list[str] | None = None) -> Path:
    """A local path for ``spec``, downloading a Hub repo's needed files when it is not local."""
    path = Path(spec).expanduser()
    if os.path.lexists(path):
        return path
    hub = parse_hub_id(spec)
    if hub is None:
        raise InputError(f"{spec}: no such file or folder (and not a Hub id like org/name)")
    repo, rev = hub
    folder = download(repo, rev, allow_patterns or CONFIG_PATTERNS + SAFETENSORS_PATTERNS)
    if allow_patterns is None and not any(folder.glob("*.safetensors")):
        # Old repos ship only pickles; they are read with weights_only=True, never executed.
        folder = download(repo, rev, CONFIG_PATTERNS + PICKLE_PATTERNS)
    return folder


def download(repo: str, revision: str | None, allow_patterns: list[str]) -> Path:
    """``snapshot_download`` with one clear line for every way it can fail."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hfe

    where = f"{repo}@{revision}" if revision else repo
    try:
        return Path(hf.snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except hfe.RepositoryNotFoundError as e:
        raise HubError(f"{where}: repository not found on the Hub, or private and your token "
                       "has no access (check the name; set HF_TOKEN or run `hf auth login`)"
                       ) from e
    except hfe.RevisionNotFoundError as e:
        raise HubError(f"{where}: revision {revision!r} not found (check the branch, tag or "
                       "commit)") from e
    except hfe.GatedRepoError as e:
        raise HubError(f"{where}: gated repository; accept its terms on the Hub and set "
                       "HF_TOKEN") from e
    except hfe.LocalEntryNotFoundError as e:
        raise HubError(f"{where}: not in the local cache and the Hub cannot be reached "
                       "(offline?); connect, or unset HF_HUB_OFFLINE") from e
    except hfe.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise HubError(f"{where}: the Hub answered HTTP {status}; retry, or check "
                       "HF_ENDPOINT and your token") from e
    except OSError as e:
        raise HubError(f"{where}: cannot reach the Hub ({type(e).__name__}); check the "
                       "network or use a local path") from e
    except Exception as e:  # httpx errors do not share a base class with the above
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise HubError(f"{where}: cannot reach the Hub ({type(e).__name__}); check the "
                           "network or use a local path") from e
        raise
