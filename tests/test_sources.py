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

from loratool.headers.sources import parse_hub_id

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


# --------------------------------------------------------------------------- over HTTP

from hub_server import HubServer  # noqa: E402


@pytest.fixture
def hub(tmp_path, sharded_dir, bin_dir, peft_dir):
    with HubServer() as server:
        server.add("acme/sharded", sharded_dir)
        server.add("acme/sharded", sharded_dir, ref="v1")
        server.add("acme/pickles", bin_dir)
        server.add("acme/adapter", peft_dir)
        from conftest import run_cli

        (tmp_path / "kohya").mkdir()
        assert run_cli("convert", peft_dir, "--to", "kohya", "-o",
                       tmp_path / "kohya" / "lora.safetensors").rc == 0
        server.add("acme/kohya", tmp_path / "kohya")
        server.env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
                      "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                      "HF_HUB_DISABLE_TELEMETRY": "1", "CWD": str(tmp_path)}
        yield server


def _run(env, args, code=None):
    env = {**os.environ, **env}
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "loratool", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=env["CWD"])


def test_inspect_over_http_reads_headers_only(hub, sharded_dir):
    res = _run(hub.env, ["inspect", "acme/sharded", "--json"])
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    local = json.loads(_run(hub.env, ["inspect", str(sharded_dir), "--json"]).stdout)
    assert d["tensors"] == local["tensors"] and d["total_bytes"] == local["total_bytes"]
    assert d["architecture"] == "LlamaForCausalLM"
    assert hub.downloads(".safetensors") == []  # no weights downloaded, only ranged reads
    ranged = [p for m, p, r in hub.log if r and p.endswith(".safetensors")]
    assert len(ranged) == d["shards"]
    assert hub.downloads("config.json") and hub.downloads("model.safetensors.index.json")


def test_loading_one_tensor_downloads_one_shard(hub, sharded_dir):
    code = f"""
import torch
from loratool.io.tensors import open_checkpoint
remote, local = open_checkpoint("acme/sharded@v1"), open_checkpoint({str(sharded_dir)!r})
name = "model.layers.1.mlp.down_proj.weight"
assert torch.equal(remote.load(name), local.load(name))
assert torch.equal(remote.load(name), local.load(name))
print(remote.info(name).file.name)
"""
    res = _run(hub.env, [], code)
    assert res.returncode == 0, res.stderr
    shard = res.stdout.strip()
    assert [p.rsplit("/", 1)[1] for p in hub.downloads(".safetensors")] == [shard]


def test_pickled_repo_and_adapter_over_http(hub, peft_dir):
    res = _run(hub.env, ["inspect", "acme/pickles", "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["format"] == "pytorch"
    assert len(hub.downloads(".bin")) == 1  # a pickle has no header to read remotely
    res = _run(hub.env, ["inspect", "acme/adapter", "--json"])
    d = json.loads(res.stdout)
    assert d["kind"] == "adapter" and len(d["modules"]) == 6
    res = _run(hub.env, ["inspect", "acme/kohya", "--json"])
    assert res.returncode == 0 and res.stderr == "", res.stderr  # no hub bars or warnings
    d = json.loads(res.stdout)
    assert d["format"] == "kohya" and len(d["modules"]) == 6


def test_against_hub_model_and_errors(hub, sharded_dir):
    res = _run(hub.env, ["inspect", str(sharded_dir), "--against", "acme/sharded", "--json"])
    assert res.returncode == 0, res.stderr
    c = json.loads(res.stdout)["compare"]
    assert c["changed"] == [] and c["unchanged"] == c["compared"] > 0
    for spec, needle in (("acme/nothing", "no such repository"),
                         ("acme/sharded@v9", "revision 'v9' not found")):
        res = _run(hub.env, ["inspect", spec])
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_hub_down_is_one_line(hub):
    env = {**hub.env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    res = _run(env, ["inspect", "acme/sharded"])
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "cannot be reached" in res.stderr or "cannot reach the Hub" in res.stderr


def test_extract_with_a_hub_id_from_the_offline_cache(hub_env, llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(llama_dir, tuned)
    state = load_file(tuned / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key] + torch.randn(64, 2) @ torch.randn(2, 64) * 0.01
    save_file(state, tuned / "model.safetensors", metadata={"format": "pt"})
    res = _cli(hub_env, "extract", "acme/tiny-llama", tuned, "-o", tmp_path / "ad", "--rank",
               "2", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert [m["name"] for m in rep["modules"]] == ["model.layers.0.self_attn.q_proj"]
    assert rep["modules"][0]["rel_error"] < 1e-5
