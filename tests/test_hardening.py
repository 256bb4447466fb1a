"""Hardening: nothing lost on interrupt, crash or a full disk; concurrent runs; hostile and
malformed inputs give one line, never an internal error, a hang or a memory blow-up."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tree

from loratool.io.tensors import open_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("hard")
    build_pair(d, max_shard_size="300KB")
    return d


def _cli(*args: object, env: dict[str, str] | None = None, **kw: object):
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          **kw)


def _one_line(err: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err


def _leftovers(folder: Path, out: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(f".{out}.")]


# --------------------------------------------------------------------------- nothing lost


def test_interrupt_during_verify_keeps_the_old_output(demo, tmp_path, monkeypatch):
    import loratool.verbs.merge_checkpoint as merge

    out = tmp_path / "m"
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", out).rc == 0
    before = tree(out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "verify_output", interrupted)
    res = run_cli("merge", demo / "base", demo / "adapter", "-o", out, "--force", "--verify")
    assert res.rc == 130 and tree(out) == before and not _leftovers(tmp_path, "m")


def test_ctrl_c_at_any_moment_leaves_old_or_new(demo, tmp_path):
    """SIGINT at random moments of `merge --force --verify`, from the imports on: the output
    is always there and whole (old or new), the exit code never 0 after an interrupt."""
    out = tmp_path / "m"
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", out).rc == 0
    rng = random.Random(4)
    for _ in range(6):
        p = subprocess.Popen([sys.executable, "-m", "loratool", "merge", demo / "base",
                              demo / "adapter", "-o", out, "--force", "--verify"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.05, 2.5))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 130), err  # 0 only when it finished before the signal
        if p.returncode == 130:
            assert "interrupted" in err and "internal error" not in err, err
        assert open_checkpoint(out).tensors  # old or new, whole
        assert not _leftovers(tmp_path, "m")


def test_ctrl_c_inside_an_import_waits_for_the_import(tmp_path):
    """An interrupt during an import is raised after it, not inside: torch's import runs
    Python under C++ frames, where a raised KeyboardInterrupt ends the process by SIGABRT."""
    (tmp_path / "slow_module.py").write_text(
        "import signal, time\nsignal.raise_signal(signal.SIGINT)\ntime.sleep(0.2)\n"
        "FINISHED = True\n")
    code = ("import sys, time\nfrom loratool import interrupts\ninterrupts.install()\n"
            "try:\n    import slow_module\nexcept KeyboardInterrupt:\n    sys.exit(3)\n"
            "assert slow_module.FINISHED and interrupts.interrupted()\n"
            "try:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}"
                              f"{os.environ.get('PYTHONPATH', '')}"}, timeout=60)
    assert res.returncode == 130, res.stderr  # 3: raised inside the import


def test_two_runs_to_one_output(demo, tmp_path):
    """Two merges to the same -o at once: one writes, the other says so; the output is whole."""
    out = tmp_path / "m"
    code = ("import time, loratool.io.writer as w\n"
            "add = w.CheckpointWriter.add\n"
            "def slow(self, *a):\n    time.sleep(0.03)\n    add(self, *a)\n"
            "w.CheckpointWriter.add = slow\n"
            "from loratool.cli import main\n"
            f"main(['merge', {str(demo / 'base')!r}, {str(demo / 'adapter')!r}, '-o', "
            f"{str(out)!r}, '--verify'])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert "another loratool" in err or "already exists" in err, err
    _one_line(err)
    assert open_checkpoint(out).tensors and not _leftovers(tmp_path, "m")


@pytest.mark.parametrize("where", ["write", "flush", "report"])
def test_disk_full_is_one_line_and_writes_nothing(demo, tmp_path, monkeypatch, where):
    import errno


    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":  # in the background writer thread
        monkeypatch.setattr(os, "pwrite", full)
        args = ["merge", demo / "base", demo / "adapter", "-o", tmp_path / "out"]
    elif where == "flush":  # delayed allocation: the disk fills when the data is flushed
        monkeypatch.setattr(os, "fsync", full)
        args = ["merge", demo / "base", demo / "adapter", "-o", tmp_path / "out"]
    else:  # the report is staged first, so the adapter never appears without it
        import pathlib

        real = pathlib.Path.write_text

        def text(self, *a, **k):
            if self.name == "r.json":
                full()
            return real(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "write_text", text)
        args = ["extract", demo / "base", demo / "tuned", "-o", tmp_path / "out", "--rank", "2",
                "--report", tmp_path / "r.json"]
    res = run_cli(*args)
    assert res.rc == 1 and "no space left" in res.err and "GB free" in res.err, res.err
    _one_line(res.err)
    assert os.listdir(tmp_path) == []


def test_read_only_and_unwritable_outputs(demo, tmp_path, monkeypatch):
    import errno
    import tempfile

    def readonly(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", "x")

    monkeypatch.setattr(tempfile, "mkdtemp", readonly)
    res = run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "out")
    assert res.rc == 1 and "read-only" in res.err, res.err
    _one_line(res.err)
    monkeypatch.undo()
    res = run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / ("x" * 300))
    assert res.rc == 1 and "too long" in res.err, res.err
    assert os.listdir(tmp_path) == []


def test_force_never_deletes_an_unrelated_folder(demo, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    res = run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "notes", "--force")
    assert res.rc == 1 and "thesis.tex" in res.err and "remove it yourself" in res.err
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "years of work"


def test_outputs_are_flushed_to_disk(demo, tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "m").rc == 0
    files = {str(p) for p in (tmp_path / "m").rglob("*") if p.is_file()}
    # every file and the folder, in the temporary folder before the rename; then the parent
    assert len(synced) >= len(files) + 2
    assert synced[-1] == str(tmp_path)
    synced.clear()
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "m2",
                   "--no-fsync").rc == 0
    assert synced == []
    # the flag is one command's: the next one flushes again
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "m3").rc == 0
    assert synced
    synced.clear()
    monkeypatch.setenv("LORATOOL_NO_FSYNC", "1")
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "m4").rc == 0
    assert synced == []


def test_without_the_fast_system_calls(demo, tmp_path, monkeypatch):
    """macOS has no preadv nor copy_file_range, Windows not even pread: same bytes."""
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "fast").rc == 0
    for name in ("preadv", "pread", "copy_file_range"):
        monkeypatch.delattr(os, name, raising=False)
    import loratool.verbs.merge_settings as settings

    monkeypatch.setattr(settings, "resource", None)  # Windows has no resource module
    res = run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "slow", "--verify")
    assert res.rc == 0, res.err
    assert "peak RSS n/a" in res.out
    assert tree(tmp_path / "slow") == tree(tmp_path / "fast")


# --------------------------------------------------------------------------- hostile inputs


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, says", [
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5001 + b'], "data_offsets": [0, 4]}}',
     "not valid JSON"),
    (b'{"\\ud800x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "not valid UTF-8"),
    (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),
    (b'{"a": {"dtype": "F32", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}',
     "invalid shape")])
def test_hostile_headers(tmp_path, header, says):
    p = _safetensors(tmp_path / "x.safetensors", header, bytes(4))
    res = run_cli("inspect", p)
    assert res.rc == 1 and says in res.err, res.err
    _one_line(res.err)


# `loratool inspect FILE`, then its exit code, its peak RSS in KiB (VmHWM: this process's
# own, unlike ru_maxrss, which Linux carries over from the forked parent) and whether torch
# was imported
PEAK = ("import sys; from loratool.cli import main\n"
        "try:\n    main(['inspect', sys.argv[1]])\nexcept SystemExit as e:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "    print(e.code, hwm.split()[1], 'torch' in sys.modules)\n")


def test_a_header_of_a_million_tensors_is_refused_before_parsing(tmp_path):
    entries = b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                        for i in range(300_000))
    p = _safetensors(tmp_path / "x.safetensors", b"{" + entries + b"}")
    out = subprocess.run([sys.executable, "-c", PEAK, str(p)], capture_output=True, text=True,
                         timeout=120)
    rc, rss_kb, _ = out.stdout.split()
    assert rc == "1" and "more than 262,144 tensors" in out.stderr, out.stderr
    assert int(rss_kb) < 300 * 1024


def test_zip_bomb_is_refused_before_it_inflates(tmp_path):
    import zipfile

    p = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data.pkl", "w") as f:
            block = bytes(1 << 20)
            for _ in range(1024):  # 1 GiB of zeros, ~1 MB on disk
                f.write(block)
    assert p.stat().st_size < 5 * 2**20
    out = subprocess.run([sys.executable, "-c", PEAK, str(p)], capture_output=True, text=True,
                         timeout=120)
    rc, rss_kb, torch_loaded = out.stdout.split()
    assert rc == "1" and "zip bomb" in out.stderr, out.stderr
    assert int(rss_kb) < 300 * 1024 and torch_loaded == "False"


def test_a_fifo_is_not_opened(tmp_path, sharded_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    res = _cli("inspect", d, timeout=60)
    assert res.returncode == 1 and "named pipe" in res.stderr, res.stderr
    _one_line(res.stderr)


def _peft(tmp_path, name="a", **cfg):
    """A tiny PEFT adapter written by hand, with config fields overridden."""
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    save_file({"base_model.model.q.lora_A.weight": torch.randn(2, 4),
               "base_model.model.q.lora_B.weight": torch.randn(4, 2)},
              d / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], **cfg}
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("cfg, says", [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -4}, "r must be a positive integer"),
    ({"r": 3}, "has rank 2"),
    ({"rank_pattern": {"q": 5}}, "has rank 2"),
    ({"task_type": ["CAUSAL_LM"]}, "task_type must be a string"),
    ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a string"),
    ({"alpha_pattern": {"[": 2}}, "not a valid regular expression")])
def test_hostile_adapter_configs(tmp_path, cfg, says):
    d = _peft(tmp_path, **cfg)
    for cmd in (["inspect", d, "--json"], ["convert", d, "--format", "kohya", "-o",
                                           tmp_path / "k.safetensors"]):
        res = run_cli(*cmd)
        assert res.rc == 1 and says in res.err, (cmd, res.err)
        _one_line(res.err)
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|a)+$"])
def test_catastrophic_patterns_answer(tmp_path, pattern):
    """Patterns that take exponential time in Python's re against a long module name: the
    issue's `(a+)+$` (fast on the engine loratool uses) and `(a|a)+$` (not: refused by the
    time limit). inspect answers either way instead of hanging."""
    from safetensors.torch import save_file

    d = tmp_path / "a"
    d.mkdir()
    mod = "base_model.model.layers." + "a" * 40 + "x"
    save_file({f"{mod}.lora_A.weight": torch.randn(2, 4),
               f"{mod}.lora_B.weight": torch.randn(4, 2)}, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {pattern: 8}}))
    res = _cli("inspect", d, timeout=120)
    if pattern == "(a|a)+$":
        assert res.returncode == 1 and "catastrophic backtracking" in res.stderr, res.stderr
    else:
        assert res.returncode == 0, res.stderr


def test_adapter_config_that_is_not_an_object(tmp_path):
    d = _peft(tmp_path)
    (d / "adapter_config.json").write_text("[1, 2]")
    res = run_cli("inspect", d)
    assert res.rc == 1 and "holds a JSON list, not an object" in res.err, res.err


def test_kohya_metadata_of_the_wrong_type(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "k.safetensors"
    save_file({"lora_unet_q.lora_down.weight": torch.randn(2, 4),
               "lora_unet_q.lora_up.weight": torch.randn(4, 2)}, p,
              metadata={"loratool.modules": "7"})
    res = run_cli("convert", p, "--format", "peft", "-o", tmp_path / "o")
    assert res.rc == 1 and "loratool.modules must map" in res.err, res.err


def test_replacement_of_the_wrong_shape_and_empty_adapters(demo, tmp_path):
    from safetensors.torch import save_file

    d = _peft(tmp_path)
    save_file({"base_model.model.model.norm.weight": torch.ones(3, 3)},
              d / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["norm"]}))
    res = run_cli("merge", demo / "base", d, "-o", tmp_path / "m")
    assert res.rc == 1 and "[3, 3] but the base's is [256]" in res.err, res.err
    save_file({}, d / "adapter_model.safetensors")
    res = run_cli("merge", demo / "base", d, "-o", tmp_path / "m")
    assert res.rc == 1 and "nothing in it to apply" in res.err, res.err
    assert not (tmp_path / "m").exists()


def test_escape_sequences_in_names_are_shown_escaped(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"\x1b]0;pwned\x07\x1b[2Jlayer.weight": torch.ones(2)}, p)
    res = _cli("inspect", p, "--all")
    assert res.returncode == 0 and "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "\\x1b]0;pwned\\x07" in res.stdout
    assert "\\u001b" in _cli("inspect", p, "--json").stdout  # JSON escapes them itself


def test_card_fields_cannot_inject(tmp_path):
    import yaml

    from loratool.verbs.hub import model_card

    d = _peft(tmp_path, base_model_name_or_path="org/base\nlibrary_name: evil\n")
    card = model_card(d)
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "base_model" not in front


def test_push_trusts_only_the_real_hub_cache(tmp_path, monkeypatch):
    from loratool.errors import InputError
    from loratool.verbs.hub import _files

    d = _peft(tmp_path)
    (tmp_path / "x" / "blobs").mkdir(parents=True)
    (tmp_path / "x" / "blobs" / "id_rsa").write_text("secret")
    (d / "key.json").symlink_to(tmp_path / "x" / "blobs" / "id_rsa")
    with pytest.raises(InputError, match="outside the folder"):
        _files(d, [], [])
    cache = tmp_path / "hf"
    blob = cache / "models--org--name" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_text("{}")
    (d / "key.json").unlink()
    (d / "cached.json").symlink_to(blob)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert any(p.name == "cached.json" for p in _files(d, [], []))


# --------------------------------------------------------------------------- the Hub


class _Server:
    """A local HTTP server with a handler function, in a thread."""

    def __init__(self, handle):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                handle(self)

            do_HEAD = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


HUB_ENV = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_secret",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "2",
           "HF_HUB_ETAG_TIMEOUT": "2"}


def test_a_silent_hub_is_a_timeout_not_a_hang(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # accepts connections (the kernel does) and never answers
    try:
        env = {**HUB_ENV, "HF_ENDPOINT": f"http://127.0.0.1:{sock.getsockname()[1]}",
               "HF_HUB_CACHE": str(tmp_path / "c")}
        for args in (["inspect", "org/model"], ["pull", "org/model", "-o", tmp_path / "p"]):
            res = _cli(*args, env=env, timeout=240)
            assert res.returncode == 1 and "did not answer within 2 s" in res.stderr, res.stderr
            _one_line(res.stderr)
    finally:
        sock.close()


@pytest.mark.parametrize("status, says", [(500, "HTTP 500"), (403, "no permission")])
def test_hub_errors_say_what_the_hub_said(tmp_path, status, says):
    def handle(h):
        h.send_response(status)
        h.send_header("Content-Length", "0")
        h.end_headers()

    server = _Server(handle)
    try:
        env = {**HUB_ENV, "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "c")}
        res = _cli("inspect", "org/model", env=env, timeout=240)
        assert res.returncode == 1 and says in res.stderr and "offline" not in res.stderr, \
            res.stderr
        _one_line(res.stderr)
    finally:
        server.close()


def test_redirects_elsewhere_never_carry_the_token(tmp_path):
    seen = []

    def other(h):
        seen.append(dict(h.headers))
        h.send_response(404)
        h.send_header("Content-Length", "0")
        h.end_headers()

    b = _Server(other)

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", b.url + h.path)
        h.send_header("Content-Length", "0")
        h.end_headers()

    a = _Server(redirect)
    try:
        env = {**HUB_ENV, "HF_ENDPOINT": a.url, "HF_HUB_CACHE": str(tmp_path / "c")}
        res = _cli("pull", "org/model", "-o", tmp_path / "p", env=env, timeout=240)
        assert res.returncode == 1 and "hf_secret" not in res.stderr
        _one_line(res.stderr)
        assert seen and not any("authorization" in {k.lower() for k in hdr} for hdr in seen)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("data", [b"\x80", b"\x80\x02", b"\x80\x02]q\x00", b"\x80\x02}q\x00(X"])
def test_bytes_that_start_like_a_pickle(demo, tmp_path, data):
    """A safetensors shard cut to bytes that look like a pickle's start (a header length
    of 0x80…), and a .bin that is such a cut pickle: one line each, never torch's or
    safetensors' own exceptions (torch hands a .safetensors path to safetensors' reader)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(demo / "base", base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(data)
    res = run_cli("inspect", base)
    assert res.rc == 1 and shard.name in res.err and "safetensors" in res.err, res.err
    _one_line(res.err)
    (tmp_path / "w.bin").write_bytes(data)
    res = run_cli("inspect", tmp_path / "w.bin")
    assert res.rc == 1 and "not a readable PyTorch checkpoint" in res.err, res.err
    _one_line(res.err)
