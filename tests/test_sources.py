"""Hub ids as inputs: parsing, and resolution through huggingface_hub's cache offline.

The pull/push tests against a real HTTP server come with the Hub issue; here the real client
resolves ids from a warm cache with HF_HUB_OFFLINE=1, as a user on a plane would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from loratool.sources import parse_hub_id

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_parse_hub_id():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for not_an_id in ("./org/name", "/abs/path", "model.safetensors", "a/b/c", "org/"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def _warm_cache(cache, repo: str, files: dict[str, bytes], ref: str = "main") -> None:
    """Lay out a Hub cache as huggingface_hub writes it: blobs, snapshots of symlinks, refs."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / SHA
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(root / "blobs" / digest, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(SHA)


def _cli(env_extra, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=env_extra["CWD"])


@pytest.fixture
def hub_env(tmp_path, llama_dir):
    cache = tmp_path / "cache"
    files = {n: (llama_dir / n).read_bytes() for n in ("model.safetensors", "config.json")}
    _warm_cache(cache, "acme/tiny-llama", files)
    work = tmp_path / "work"
    work.mkdir()
    return {"HF_HUB_CACHE": str(cache), "CWD": str(work)}


def test_hub_id_resolves_from_warm_cache(hub_env, llama_dir):
    res = _cli(hub_env, "inspect", "acme/tiny-llama", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["source"] == "acme/tiny-llama" and d["architecture"] == "LlamaForCausalLM"
    assert SHA in d["path"]
    res = _cli(hub_env, "inspect", f"acme/tiny-llama@{SHA}", "--json")
    assert res.returncode == 0, res.stderr
    # --against a local copy: same bytes, so nothing changed
    res = _cli(hub_env, "inspect", "acme/tiny-llama", "--against", llama_dir, "--json")
    assert json.loads(res.stdout)["compare"]["changed"] == []


def test_local_path_wins_over_hub_id(hub_env, llama_dir):
    local = os.path.join(hub_env["CWD"], "acme", "tiny-llama")
    shutil.copytree(llama_dir, local)
    os.remove(os.path.join(local, "config.json"))
    res = _cli(hub_env, "inspect", "acme/tiny-llama", "--json")
    d = json.loads(res.stdout)
    assert d["architecture"] is None and SHA not in d["path"]  # the local copy, no config


def test_hub_errors_are_one_line(hub_env):
    for spec in ("acme/missing", "acme/tiny-llama@no-such-branch"):
        res = _cli(hub_env, "inspect", spec)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("loratool: error: ") and spec in lines[0]
        assert "Traceback" not in res.stderr
