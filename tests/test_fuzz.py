"""A fuzz suite: valid files mutated at random (safetensors headers and bytes, shard indexes,
adapter configs, kohya and diffusers metadata), then inspect, convert and merge run on them.

Every run must end in success or one line saying what is wrong (exit 1, or 2 for a usage
error), within a time limit, never with an internal error or a traceback, and never leave a
partial output. Cases it found are kept as explicit examples.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
SECONDS = 60  # a hang detector, not a benchmark: a healthy run takes well under a second

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6)


@contextmanager
def _limit():
    def hang(signum, frame):
        raise TimeoutError(f"a run took more than {SECONDS} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(*args: object):
    with _limit():
        res = run_cli(*args)
    assert res.rc in (0, 1, 2), res
    assert "internal error" not in res.err and "Traceback" not in res.err, res.err
    if res.rc == 1:
        assert len(res.err.strip().splitlines()) == 1, res.err
    return res


def _clean(folder: Path, out: Path, res) -> None:
    """No partial output: nothing hidden left beside it, and nothing at all after a failure."""
    assert not [n for n in os.listdir(folder) if n.startswith(f".{out.name}.")]
    if res.rc != 0:
        assert not out.exists()


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("fuzz")
    build_pair(d, max_shard_size="300KB")
    run_cli("convert", d / "adapter", "--format", "kohya", "-o", d / "k.safetensors")
    run_cli("convert", d / "adapter", "--format", "diffusers", "-o", d / "diff.safetensors")
    return d


def _case(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("case")


def _read_header(p: Path) -> tuple[dict, bytes]:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(p: Path, header: object, data: bytes) -> None:
    h = json.dumps(header).encode("utf-8", "surrogatepass")
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)


# --------------------------------------------------------------------------- safetensors


@FUZZ
@given(st.data())
@example(data=None)  # the file as it is: must succeed
def test_mutated_safetensors_headers(valid, tmp_path_factory, data):
    d = _case(tmp_path_factory)
    p = d / "model.safetensors"
    shutil.copy(valid / "adapter" / "adapter_model.safetensors", p)
    shutil.copy(valid / "adapter" / "adapter_config.json", d / "adapter_config.json")
    header, body = _read_header(p)
    if data is not None:
        names = sorted(header)
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = data.draw(json_values)
        if field is None:
            header[data.draw(st.text(max_size=20))] = value
        elif name == "__metadata__":
            header[name] = value
        else:
            header[name][field] = value
        _write_header(p, header, body)
    res = _run("inspect", p, "--json")
    if data is None:
        assert res.rc == 0
    res = _run("convert", d, "--format", "kohya", "-o", d / "k.safetensors")
    _clean(d, d / "k.safetensors", res)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 6000)))
def test_mutated_safetensors_bytes(valid, tmp_path_factory, flips, cut):
    d = _case(tmp_path_factory)
    src = sorted((valid / "base").glob("model-*.safetensors"))[0]
    raw = bytearray(src.read_bytes())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    shutil.copytree(valid / "base", d / "base")
    (d / "base" / src.name).write_bytes(bytes(raw[:cut] if cut is not None else raw))
    _run("inspect", d / "base")
    res = _run("merge", d / "base", valid / "adapter", "-o", d / "m")
    _clean(d, d / "m", res)


@FUZZ
@given(flips=st.lists(st.tuples(st.one_of(st.integers(0, 1200), st.integers(0, 10**6)),
                                st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 3000), st.integers(0, 10**6)))
@example(flips=[(0, 71)], cut=None)  # the file as it is (byte 0 is already 'G'): succeeds
def test_mutated_gguf_adapters(valid, tmp_path_factory, flips, cut):
    """A GGUF adapter's header and data bytes changed or cut: inspect, read it back to PEFT
    names, and merge it."""
    d = _case(tmp_path_factory)
    src = valid / "a.gguf"
    if not src.exists():
        run_cli("convert", valid / "adapter", "--format", "gguf", "--base", valid / "base",
                "-o", src)
    raw = bytearray(src.read_bytes())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    (d / "a.gguf").write_bytes(bytes(raw[:cut] if cut is not None else raw))
    _run("inspect", d / "a.gguf")
    res = _run("convert", d / "a.gguf", "--to", "peft", "--base", valid / "base", "-o", d / "p")
    _clean(d, d / "p", res)
    res = _run("merge", valid / "base", d / "a.gguf", "-o", d / "m")
    _clean(d, d / "m", res)


@FUZZ
@given(mutation=st.sampled_from(["value", "add", "drop", "map", "metadata", "path"]),
       value=json_values, path=st.sampled_from(["../x.safetensors", "/etc/passwd", "", ".",
                                                "model-00001-of-00009.safetensors"]))
def test_mutated_shard_indexes(valid, tmp_path_factory, mutation, value, path):
    d = _case(tmp_path_factory)
    shutil.copytree(valid / "base", d / "base")
    idx_path = d / "base" / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    name = sorted(idx["weight_map"])[0]
    if mutation == "value":
        idx["weight_map"][name] = value
    elif mutation == "add":
        idx["weight_map"]["x.weight"] = path
    elif mutation == "drop":
        del idx["weight_map"][name]
    elif mutation == "map":
        idx["weight_map"] = value
    elif mutation == "metadata":
        idx["metadata"] = value
    else:
        idx["weight_map"][name] = path
    idx_path.write_text(json.dumps(idx))
    _run("inspect", d / "base", "--json")
    res = _run("merge", d / "base", valid / "adapter", "-o", d / "m")
    _clean(d, d / "m", res)


# --------------------------------------------------------------------------- adapters


ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
                "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias",
                "modules_to_save", "base_model_name_or_path", "revision", "task_type", "bias",
                "ensure_weight_tying"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(ADAPTER_KEYS), json_values, min_size=1,
                               max_size=3),
       whole=st.one_of(st.none(), json_values))
@example(changes={"alpha_pattern": {"(a|a)+$": 1.0}}, whole=None)
@example(changes={"r": True}, whole=None)
@example(changes={"lora_alpha": float("inf")}, whole=None)
def test_mutated_adapter_configs(valid, tmp_path_factory, changes, whole):
    d = _case(tmp_path_factory)
    shutil.copytree(valid / "adapter", d / "a")
    cfg = json.loads((d / "a" / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "a" / "adapter_config.json").write_text(
        json.dumps(whole if whole is not None else cfg))
    _run("inspect", d / "a", "--json")
    _run("inspect", d / "a")
    res = _run("convert", d / "a", "--format", "kohya", "-o", d / "k.safetensors")
    _clean(d, d / "k.safetensors", res)
    res = _run("merge", valid / "base", d / "a", "-o", d / "m")
    _clean(d, d / "m", res)


@FUZZ
@given(which=st.sampled_from(["k.safetensors", "diff.safetensors"]),
       key=st.sampled_from(["loratool.modules", "lora_adapter_metadata", "loratool.components",
                            "ss_network_dim"]),
       value=json_values, raw=st.booleans())
def test_mutated_kohya_and_diffusers_metadata(valid, tmp_path_factory, which, key, value, raw):
    d = _case(tmp_path_factory)
    p = d / which
    shutil.copy(valid / which, p)
    header, body = _read_header(p)
    header.setdefault("__metadata__", {})[key] = value if raw else json.dumps(value)
    _write_header(p, header, body)
    _run("inspect", p, "--json")
    res = _run("convert", p, "--format", "peft", "-o", d / "o", "--base", valid / "base")
    _clean(d, d / "o", res)


@FUZZ
@given(name=st.text(min_size=1, max_size=40), shape=st.lists(st.integers(0, 6), max_size=3))
def test_adapter_tensors_with_strange_names_and_shapes(valid, tmp_path_factory, name, shape):
    from safetensors.torch import load_file, save_file

    d = _case(tmp_path_factory)
    shutil.copytree(valid / "adapter", d / "a")
    state = load_file(d / "a" / "adapter_model.safetensors")
    state[name] = torch.zeros(shape)
    try:
        save_file(state, d / "a" / "adapter_model.safetensors")
    except Exception:  # names safetensors itself cannot write: nothing to test
        return
    _run("inspect", d / "a")
    res = _run("merge", valid / "base", d / "a", "-o", d / "m")
    _clean(d, d / "m", res)


# --------------------------------------------------------------------------- GGUF headers


def _gguf_bytes(kvs: list[tuple[bytes, int, bytes]], tensors: list[tuple[bytes, list[int], int,
                                                                         int]],
                data: bytes, n_kv: int | None, n_tensors: int | None) -> bytes:
    """A GGUF v3 file from parts that may lie: counts, value types and bytes, dims, types,
    offsets."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    for key, kind, value in kvs:
        head += struct.pack("<Q", len(key)) + key + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        head += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)
    return head + b"\0" * (-len(head) % 32) + data


u64 = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))
kv_values = st.one_of(
    st.binary(max_size=16),
    st.tuples(st.sampled_from([0, 4, 8, 9, 10, 99]), u64).map(  # an array: type, count
        lambda t: struct.pack("<IQ", *t)),
    u64.map(lambda n: struct.pack("<Q", n) + b"abc"))  # a string's length, a few bytes


@FUZZ
@given(kvs=st.lists(st.tuples(st.sampled_from([b"general.alignment", b"general.type",
                                               b"general.architecture", b"x"]),
                              st.integers(0, 13), kv_values), max_size=3),
       tensors=st.lists(st.tuples(st.sampled_from([b"token_embd.weight", b"a", b""]),
                                  st.lists(u64, max_size=5),
                                  st.sampled_from([0, 1, 8, 12, 14, 30, 99]), u64),
                        max_size=3),
       size=st.integers(0, 4096),
       n_kv=st.one_of(st.none(), u64), n_tensors=st.one_of(st.none(), u64))
@example(kvs=[], tensors=[(b"a", [64], 0, 0)], size=256, n_kv=None, n_tensors=None)
def test_generated_gguf_headers(valid, tmp_path_factory, kvs, tensors, size, n_kv, n_tensors):
    """GGUF headers built from parts that may lie about anything: read, inspected and merged
    into, each ends in a result or one line, quickly and in little memory."""
    d = _case(tmp_path_factory)
    p = d / "m.gguf"
    p.write_bytes(_gguf_bytes(kvs, tensors, bytes(size), n_kv, n_tensors))
    _run("inspect", p)
    res = _run("merge", p, valid / "adapter", "-o", d / "o.gguf")
    _clean(d, d / "o.gguf", res)


# --------------------------------------------------------------------------- pipeline folders

from test_pipeline import sdxl  # noqa: E402,F401  (the fixture: a tiny SDXL pipeline, a LoRA)

PIPE_FUZZ = settings(FUZZ, max_examples=40)


@PIPE_FUZZ
@given(changes=st.lists(st.tuples(
    st.sampled_from(["link out", "link in", "link loop", "fifo", "link dev", "drop", "index",
                     "deep link"]),
    st.sampled_from(["vae", "text_encoder", "unet", "model_index.json", "scheduler",
                     "text_encoder/config.json", "text_encoder/model.safetensors", "new"])),
    max_size=3), value=json_values)
@example(changes=[], value=None)
def test_mutated_pipeline_folders(sdxl, tmp_path_factory, changes, value):  # noqa: F811
    """A pipeline folder whose entries are links (out of it, into it, in a loop, to a
    device), named pipes, missing or rewritten: merge ends in a result or one line, reads
    nothing outside the folder and leaves nothing partial."""
    folder, lora = sdxl
    d = _case(tmp_path_factory)
    p = d / "pipe"
    shutil.copytree(folder, p)
    outside = d / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("secret")
    for how, where in changes:
        try:
            _mutate(p, p / where, how, outside, value)
        except OSError:  # a change an earlier one made impossible (a parent is now a link)
            pass
    res = _run("merge", p, next(lora.glob("*.safetensors")), "-o", d / "m")
    _clean(d, d / "m", res)
    if res.rc == 0:
        assert not any("secret" in f.read_text(errors="replace") for f in (d / "m").rglob("*")
                       if f.is_file() and f.stat().st_size < 100)


def _mutate(p: Path, target: Path, how: str, outside: Path, value: object) -> None:
    """One change to a pipeline folder's entry."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if how == "link out":
        target.symlink_to(outside)
    elif how == "link in":
        target.symlink_to(p / "scheduler")
    elif how == "link loop":
        target.symlink_to(target)
    elif how == "fifo":
        os.mkfifo(target)
    elif how == "link dev":
        target.symlink_to("/dev/zero")
    elif how == "index":
        target.write_text(json.dumps(value))
    elif how == "deep link":
        target.mkdir(exist_ok=True)
        (target / "x").symlink_to(outside / "id_rsa")
