"""Every bad input gets one clear line on stderr, exit code 1, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from conftest import run_cli, tree


def _write_raw(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None
               ) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _assert_clean_error(tmp_path: Path, args: list[object], *needles: str) -> str:
    before = tree(tmp_path)
    res = run_cli(*args)
    assert res.rc == 1, res
    assert res.out == ""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("loratool: error: ")
    assert "Traceback" not in res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert tree(tmp_path) == before  # inputs untouched
    if args[0] == "inspect":  # the same input to a command that writes: nothing is written
        res = run_cli("convert", args[1], "--to", "kohya", "-o", tmp_path / "o" / "x.safetensors")
        assert res.rc == 1 and len(res.err.strip().splitlines()) == 1, res.err
        assert tree(tmp_path) == before and not (tmp_path / "o").exists()
    return lines[0]


F32_1 = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def test_missing_path(tmp_path):
    _assert_clean_error(tmp_path, ["inspect", tmp_path / "nope"], "no such file")


def test_missing_relative_path_that_is_not_a_hub_id(tmp_path):
    _assert_clean_error(tmp_path, ["inspect", "./no/such/thing"], "no such file")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_error(tmp_path, ["inspect", tmp_path / "empty"], "no weights found")


def test_folder_without_weights(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    _assert_clean_error(tmp_path, ["inspect", d], "no weights found")


def test_truncated_safetensors(tmp_path, llama_dir):
    p = tmp_path / "model.safetensors"
    data = (llama_dir / "model.safetensors").read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    _assert_clean_error(tmp_path, ["inspect", p], "truncated")


def test_file_shorter_than_header_length_field(tmp_path):
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    _assert_clean_error(tmp_path, ["inspect", p], "too short")


def test_header_length_larger_than_file(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, F32_1, b"\0" * 8, length=10_000)
    _assert_clean_error(tmp_path, ["inspect", p], "header length 10000 is larger than the file")


def test_header_not_json(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, b"{not json at all", b"\0" * 8)
    _assert_clean_error(tmp_path, ["inspect", p], "not valid JSON")


def test_data_offsets_past_end(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    _assert_clean_error(tmp_path, ["inspect", p], "'w'", "truncated")


def test_overlapping_offsets(tmp_path):
    p = tmp_path / "x.safetensors"
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    _write_raw(p, hdr, b"\0" * 12)
    _assert_clean_error(tmp_path, ["inspect", p], "overlap")


def test_unknown_dtype(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"w": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    _assert_clean_error(tmp_path, ["inspect", p], "unknown dtype 'F13'")


def test_shape_does_not_match_bytes(tmp_path):
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    _assert_clean_error(tmp_path, ["inspect", p], "needs 12 bytes", "hold 8")


def test_index_names_missing_shard(tmp_path, sharded_dir):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    shard = sorted(d.glob("model-0000*.safetensors"))[-1]
    shard.unlink()
    _assert_clean_error(tmp_path, ["inspect", d], shard.name, "no such file")


def test_index_names_file_outside_folder(tmp_path, llama_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(llama_dir / "model.safetensors", tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "../outside.safetensors"}}))
    _assert_clean_error(tmp_path, ["inspect", d], "outside its folder")


def test_index_without_weight_map(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    _assert_clean_error(tmp_path, ["inspect", d], "no weight_map")


class Evil:
    """Unpickling this would create a marker file: it must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "evil": Evil(str(marker))}, p)
    msg = _assert_clean_error(tmp_path, ["inspect", p], "refused", "safetensors")
    assert not marker.exists(), msg
    # also a raw (non-zip) pickle stream
    p.write_bytes(pickle.dumps({"w": Evil(str(marker))}))
    _assert_clean_error(tmp_path, ["inspect", p])
    assert not marker.exists()


def test_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _assert_clean_error(tmp_path, ["inspect", tmp_path / "a"], "symlink loop")


def test_broken_symlink(tmp_path):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "gone.safetensors")
    _assert_clean_error(tmp_path, ["inspect", tmp_path / "a.safetensors"], "broken symlink")


def test_unreadable_file(tmp_path, llama_dir):
    """Permission denied. Root reads everything, so as root the check runs in a forked child
    that has dropped to the ``nobody`` user."""
    import loratool.cli  # noqa: F401  (imports happen before privileges are dropped)
    import loratool.verbs.inspect  # noqa: F401

    d = Path(tempfile.mkdtemp(prefix="loratool-perm-"))
    try:
        os.chmod(d, 0o755)
        p = d / "model.safetensors"
        shutil.copy(llama_dir / "model.safetensors", p)
        os.chmod(p, 0)
        if os.geteuid() != 0:
            _assert_clean_error(d, ["inspect", p], "permission denied")
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.setgid(65534)
                os.setuid(65534)
                res = run_cli("inspect", p)
                os.write(w, json.dumps([res.rc, res.out, res.err]).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            rc, out, err = json.loads(f.read())
        os.waitpid(pid, 0)
        assert rc == 1 and out == ""
        assert err.startswith("loratool: error: ") and "permission denied" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        shutil.rmtree(d)


def test_several_weight_files_without_index(tmp_path, llama_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(llama_dir / "model.safetensors", d / "a.safetensors")
    shutil.copy(llama_dir / "model.safetensors", d / "b.safetensors")
    _assert_clean_error(tmp_path, ["inspect", d], "several weight files")


def test_adapter_config_without_weights(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    _assert_clean_error(tmp_path, ["inspect", d], "adapter's weights are missing")


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATOOL_DEBUG", "1")
    res = run_cli("inspect", tmp_path / "nope")
    assert res.rc == 1 and "Traceback" in res.err and "no such file" in res.err


def test_usage_error_exits_2():
    assert run_cli("inspect").rc == 2
    assert run_cli("no-such-command").rc == 2
