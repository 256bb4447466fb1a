"""Hostile inputs on the newer surfaces: pipeline folders that link outside themselves, export
configs that lie about the weights, GGUF headers that lie about their data, and the inputs
that used to end in an internal error. Each is refused in one line (exit 1), reads and writes
nothing it should not, or, where the input is valid, gives the right result."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tree
from safetensors.torch import load_file, save_file
from test_pipeline import sdxl  # noqa: F401  (the fixture: a tiny SDXL pipeline and a LoRA)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("hostile")
    build_pair(d)
    return d


def _refused(res, *needles: str) -> str:
    """Exit 1 with one line that holds every needle."""
    assert res.rc == 1, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error: "), res.err
    assert "internal error" not in res.err and "Traceback" not in res.err, res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _lora_file(lora: Path) -> Path:
    return next(lora.glob("*.safetensors"))


# --------------------------------------------------------------------------- inside the input


def _secret(tmp_path: Path) -> Path:
    s = tmp_path / "elsewhere"
    s.mkdir()
    (s / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return s


def _pipeline_copy(sdxl_folder: Path, tmp_path: Path) -> Path:
    p = tmp_path / "pipe"
    shutil.copytree(sdxl_folder, p)
    return p


@pytest.mark.parametrize("how", ["component", "top file", "other model", "device", "fifo"])
def test_a_pipeline_never_reads_outside_itself(sdxl, tmp_path, how):  # noqa: F811
    """A component or file linked out of the pipeline folder (a key, another model, a device)
    or a named pipe in it: refused by name before anything is read; nothing is written."""
    folder, lora = sdxl
    p = _pipeline_copy(folder, tmp_path)
    secret = _secret(tmp_path)
    if how == "component":
        shutil.rmtree(p / "vae")
        (p / "vae").symlink_to(secret)
        name = "vae"
    elif how == "top file":
        (p / "notes.txt").symlink_to(secret / "id_rsa")
        name = "notes.txt"
    elif how == "other model":  # the component the adapter changes, linked to another copy
        other = tmp_path / "other"
        shutil.copytree(folder / "text_encoder", other)
        shutil.rmtree(p / "text_encoder")
        (p / "text_encoder").symlink_to(other)
        name = "text_encoder"
    elif how == "device":
        (p / "zero.bin").symlink_to("/dev/zero")
        name = "zero.bin"
    else:
        os.mkfifo(p / "fifo")
        name = "fifo"
    before = tree(tmp_path / "elsewhere")
    out = tmp_path / "out"
    res = run_cli("merge", p, _lora_file(lora), "-o", out)
    _refused(res, str(p / name))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert tree(tmp_path / "elsewhere") == before


def test_a_model_folder_never_reads_outside_itself(demo, tmp_path):
    """Weights, an index's shard, config.json or a tokenizer file linked out of a model folder:
    refused by name, for every command that reads it (merge copies the side files)."""
    secret = _secret(tmp_path)
    for what in ("shard", "config.json", "tokenizer.json"):
        m = tmp_path / f"model-{what}"
        shutil.copytree(demo / "base", m)
        if what == "shard":
            victim = sorted(m.glob("model-*.safetensors"))[0]
            shutil.move(victim, tmp_path / victim.name)
            victim.symlink_to(tmp_path / victim.name)
        elif what == "config.json":
            shutil.move(m / "config.json", tmp_path / "config.json")
            (m / "config.json").symlink_to(tmp_path / "config.json")
        else:
            (m / "tokenizer.json").symlink_to(secret / "id_rsa")
        res = run_cli("merge", m, demo / "adapter", "-o", tmp_path / "out")
        _refused(res, "outside")
        assert not (tmp_path / "out").exists()


def test_the_hub_cache_links_stay_allowed(demo, tmp_path):
    """The Hugging Face cache stores a snapshot as links into the repo's blobs/: such a folder
    merges as the folder it stands for."""
    repo = tmp_path / "hub" / "models--org--base"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted((demo / "base").iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    ours = run_cli("merge", snap, demo / "adapter", "-o", tmp_path / "a")
    assert ours.rc == 0, ours.err
    plain = run_cli("merge", demo / "base", demo / "adapter", "-o", tmp_path / "b")
    assert plain.rc == 0, plain.err
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_bytes() == (demo / "base" / "config.json"
                                                             ).read_bytes()
    assert not any(p.is_symlink() for p in (tmp_path / "a").rglob("*"))


def test_force_replaces_a_pipeline_output(sdxl, tmp_path):  # noqa: F811
    folder, lora = sdxl
    out = tmp_path / "out"
    for _ in range(2):
        res = run_cli("merge", folder, _lora_file(lora), "-o", out, "--force")
        assert res.rc == 0, res.err
    assert (out / "model_index.json").is_file()


# --------------------------------------------------------------------------- export configs


def _lying_config(demo: Path, tmp_path: Path, **changes: int) -> Path:
    d = tmp_path / "lying"
    shutil.copytree(demo / "base", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, says", [
    ({"hidden_size": 200000}, "[1024, 200000]"),
    ({"vocab_size": 2147483647}, "[2147483647, 256]"),
    ({"num_hidden_layers": 100000}, "layers 4–99999: config.json says 100,000 layers"),
])
def test_a_lying_config_is_refused_before_anything_is_built(demo, tmp_path, changes, says):
    """Configs that would allocate terabytes or run for minutes: one line, from a separate
    process whose peak memory stays under 1 GB (its time bound is the hang detector)."""
    d = _lying_config(demo, tmp_path, **changes)
    for mode in ([], ["--stream"], ["--adapters-as-inputs"]):
        rc, err, peak_kb = _measured([sys.executable, "-m", "loratool", "export", d,
                                      demo / "adapter", "-o", tmp_path / "onnx", *mode])
        assert rc == 1, err
        assert len(err.strip().splitlines()) == 1 and says in err, err
        assert "config" in err and not (tmp_path / "onnx").exists()
        assert peak_kb < 1024 * 1024, f"{mode}: peaked at {peak_kb / 1024:.0f} MiB"


def _measured(args: list[object]) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (KiB) of one command, run by a fresh parent whose only
    child it is (so that the peak is its own)."""
    code = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True, timeout=300)\n"
            "sys.stdout.write(r.stderr)\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, timeout=320).stdout
    *err, last = out.strip().splitlines()
    rc, peak = (int(x) for x in last.split())
    return rc, "\n".join(err) + "\n", peak


@pytest.mark.parametrize("changes, says", [
    ({"hidden_size": 8192}, "[1024, 8192]"),
    ({"intermediate_size": 99}, "gate_proj.weight as [99, 256]"),
    ({"num_hidden_layers": 1}, "holds 4 layers but config.json says 1"),
    ({"num_attention_heads": 3}, "not a multiple of the number of attention heads"),
])
def test_configs_that_do_not_fit_the_weights(demo, tmp_path, changes, says):
    d = _lying_config(demo, tmp_path, **changes)
    _refused(run_cli("export", d, demo / "adapter", "-o", tmp_path / "onnx"), says)


def test_an_export_the_memory_cannot_hold_is_refused(demo, tmp_path, monkeypatch):
    """The memory an export needs is estimated from the checked shapes and compared with what
    the machine has; in memory, the message names what --stream would need."""
    from loratool.verbs import export_check

    monkeypatch.setattr(export_check, "available_memory", lambda: 50 * 2**20)
    line = _refused(run_cli("export", demo / "base", demo / "adapter", "-o", tmp_path / "o"),
                    "GB of memory", "available", "--stream")
    need = float(line.split("needs about ")[1].split(" GB")[0])
    params = sum(t.numel() for t in load_file(next((demo / "base").glob("*00001*"))).values())
    assert need > 0 and params > 0
    res = run_cli("export", demo / "base", demo / "adapter", "-o", tmp_path / "o", "--stream")
    _refused(res, "GB of memory")


# --------------------------------------------------------------------------- GGUF as written


def _gguf(path: Path, tensors: list[tuple[str, list[int], int, int]], data: bytes,
          kv: bytes = b"", n_kv: int = 0, alignment: int = 32) -> Path:
    """A GGUF v3 file built byte by byte: ``tensors`` as (name, ggml dims, type, offset)."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv) + kv
    for name, dims, ggml_type, offset in tensors:
        head += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", ggml_type, offset)
    head += b"\0" * (-len(head) % alignment)
    path.write_bytes(head + data)
    return path


F32 = 0


def test_the_gguf_reader_equals_the_gguf_package(tmp_path):
    """On a file the gguf package wrote: the same metadata, tensors, offsets and sizes."""
    import gguf
    import numpy as np

    from loratool.headers.gguf import GGML_TYPES, read_header

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(40)])
    w.add_array("short", [1, 2, 3])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", gguf.quants.quantize(np.ones((4, 64), np.float32),
                                           gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = read_header(tmp_path / "m.gguf")
    ref = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert [(i.name, i.dtype, i.shape, i.nbytes, i.offset) for i in ours.infos] == [
        (t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.n_bytes),
         int(t.data_offset)) for t in ref.tensors]
    assert ours.kv["llama.block_count"] == 2 and ours.kv["short"] == [1, 2, 3]
    assert ours.kv["tokenizer.ggml.tokens"] == "<array of 40>"
    assert ours.kv["general.architecture"] == "llama"
    for t, (name, block, size) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)] == (block, size), name


@pytest.mark.parametrize("case, says", [
    ("misaligned", "not a multiple of the alignment"),
    ("overlap", "overlap"),
    ("too short", "beyond the file"),
    ("huge array", "claims 1,099,511,627,776 entries"),
    ("huge dims", "beyond the file"),
    ("partial blocks", "not whole blocks"),
])
def test_crafted_gguf_headers_are_refused(tmp_path, case, says):
    """Offsets misaligned or overlapping, dimensions claiming more bytes than there are, a
    metadata array of 2⁴⁰ entries: refused from the header, before anything is allocated."""
    data = bytes(range(256)) * 2  # two 64-value F32 tensors
    tensors = [("a", [64], F32, 0), ("b", [64], F32, 256)]
    kv, n_kv = b"", 0
    if case == "misaligned":
        tensors[1] = ("b", [64], F32, 260)
        data += b"\0" * 32
    elif case == "overlap":
        tensors[1] = ("b", [64], F32, 128)
    elif case == "too short":
        tensors[1] = ("b", [128], F32, 256)  # 512 bytes from 256: 256 more than the file has
    elif case == "huge array":
        key = b"tokenizer.ggml.tokens"
        kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 1 << 40)
        n_kv = 1
    elif case == "huge dims":
        tensors[1] = ("b", [64, 1 << 40], F32, 256)
    else:
        tensors[1] = ("b", [48], 8, 256)  # Q8_0 rows of 48: not blocks of 32
    p = _gguf(tmp_path / "m.gguf", tensors, data, kv, n_kv)
    for cmd in (["inspect", p], ["merge", p, p, "-o", tmp_path / "o.gguf"]):
        _refused(run_cli(*cmd), says)
    assert not (tmp_path / "o.gguf").exists()


def test_a_valid_crafted_gguf_is_read(tmp_path):
    p = _gguf(tmp_path / "m.gguf", [("a", [64], F32, 0), ("b", [64], F32, 256)],
              bytes(512))
    res = run_cli("inspect", p, "--json")
    assert res.rc == 0, res.err
    assert [t["shape"] for t in json.loads(res.out)["tensors"]] == [[64], [64]]


# --------------------------------------------------------------------------- once internal errors


def _peft_copy(demo: Path, tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path / "ad"
    shutil.copytree(demo / "adapter", d)
    sd = load_file(d / "adapter_model.safetensors")
    change(sd)
    save_file(sd, d / "adapter_model.safetensors")
    return d


def test_a_scalar_factor_is_one_line(demo, tmp_path):
    def scalar(sd):  # type: ignore[no-untyped-def]
        k = next(k for k in sd if "lora_A" in k)
        sd[k] = torch.tensor(1.0)

    d = _peft_copy(demo, tmp_path, scalar)
    for cmd in (["inspect", d], ["merge", demo / "base", d, "-o", tmp_path / "m"],
                ["convert", d, "--to", "kohya", "-o", tmp_path / "k.safetensors"],
                ["combine", d, demo / "adapter", "--method", "cat", "-o", tmp_path / "c"]):
        _refused(run_cli(*cmd), "0-D tensor", "LoRA factors are matrices")
    save_file({f"lora_unet_a.hada_w{i}_{s}": torch.tensor(1.0) for i in (1, 2) for s in "ab"},
              tmp_path / "loha.safetensors")
    for cmd in (["inspect", tmp_path / "loha.safetensors"],
                ["convert", tmp_path / "loha.safetensors", "--to", "peft", "-o", tmp_path / "p"]):
        _refused(run_cli(*cmd), "0-D tensor")


def test_a_rank_0_gguf_adapter_is_an_empty_change(demo, tmp_path):
    """Valid, and changes nothing: merge writes the base unchanged and says why; convert
    has nothing to write and says so."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "r0.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((0, 256), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((256, 0), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert run_cli("inspect", tmp_path / "r0.gguf").rc == 0
    res = run_cli("merge", demo / "base", tmp_path / "r0.gguf", "-o", tmp_path / "m", "--json")
    assert res.rc == 0, res.err
    report = json.loads(res.out)
    assert report["tensors_changed"] == 0 and report["inert_modules"]
    base = {k: v for f in sorted((demo / "base").glob("*.safetensors"))
            for k, v in load_file(f).items()}
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(base[k], merged[k]) for k in base)
    _refused(run_cli("convert", tmp_path / "r0.gguf", "--to", "peft", "-o", tmp_path / "p",
                     "--base", demo / "base"), "rank 0")


def test_deeply_nested_safetensors_headers_are_refused(tmp_path):
    """The safetensors library stops at 128 levels of JSON; a header nested deeper is refused
    by inspect (and so never reaches a library that would fail on it)."""
    deep = "[" * 200 + "]" * 200
    raw = ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + deep + "}}").encode()
    p = tmp_path / "deep.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    _refused(run_cli("inspect", p), "nests JSON")


def test_a_hub_answering_html_is_one_line(tmp_path, monkeypatch):
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b"<html>a captive portal</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _answer

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.txt").write_text("x")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_x"}
    try:
        for cmd in (["inspect", "org/name"], ["merge", "org/name", "org/ad", "-o",
                                                tmp_path / "m"],
                    ["push", tmp_path / "up", "org/name"]):
            res = subprocess.run([sys.executable, "-m", "loratool", *map(str, cmd)],
                                 capture_output=True, text=True, env=env, timeout=120)
            assert res.returncode == 1, res.stderr
            assert res.stderr.count("\n") == 1 and "not JSON" in res.stderr, res.stderr
    finally:
        server.shutdown()


def test_analyze_of_an_all_zero_base_weight(tmp_path):
    """Amplification has no value where the base weight is zero: null in JSON, n/a in the
    table, never inf."""
    torch.manual_seed(0)
    save_file({"l.weight": torch.zeros(16, 16), "m.weight": torch.randn(16, 16)},
              tmp_path / "b.safetensors")
    save_file({"l.weight": torch.randn(16, 16), "m.weight": torch.randn(16, 16)},
              tmp_path / "t.safetensors")
    res = run_cli("analyze", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "--json")
    assert res.rc == 0, res.err
    mods = {m["name"]: m for m in json.loads(res.out)["modules"]}
    assert mods["l"]["amplification"]["factor"] is None and mods["l"]["rel_delta"] is None
    assert mods["m"]["amplification"]["factor"] > 0
    text = run_cli("analyze", tmp_path / "b.safetensors", tmp_path / "t.safetensors")
    assert text.rc == 0 and "inf" not in text.out


# --------------------------------------------------------------------------- messages


def _loha(tmp_path: Path) -> Path:
    from test_lycoris import make  # a LoHa network on a tiny UNet, saved by LyCORIS

    return make(tmp_path, "loha", alpha=2, conv_alpha=1)[2]


def test_lycoris_refusals_read_as_sentences(tmp_path):
    """Refused for what it is (before asking for --base to name its modules), in a sentence."""
    f = _loha(tmp_path)
    for cmd, says in ((["resize", f, "--rank", "2", "-o", tmp_path / "r"],
                       "; resize works on LoRA factors:"),
                      (["combine", f, f, "--method", "cat", "-o", tmp_path / "c"],
                       "; combine works on LoRA factors:")):
        _refused(run_cli(*cmd), "LyCORIS modules (LoHa", says)


def test_converting_lycoris_without_a_base_says_why(tmp_path):
    """A LoHa whose module names are known (recorded in its header) still needs the base for
    its shapes, and the reason given holds for linear layers too."""
    from safetensors import safe_open

    f = _loha(tmp_path)
    with safe_open(f, "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    stems = {k.split(".")[0] for k in tensors}
    record = {s: ["unet", s.removeprefix("lora_unet_").replace("_", "."), "linear"]
              for s in stems}
    save_file(tensors, tmp_path / "named.safetensors",
              metadata={"loratool.modules": json.dumps(record)})
    _refused(run_cli("convert", tmp_path / "named.safetensors", "--to", "kohya", "--rank", "2",
                     "-o", tmp_path / "k.safetensors"), "--base", "like a linear layer's")


def test_plots_print_no_warning_of_matplotlib(demo, tmp_path):
    """matplotlib's complaint about an unwritable config folder is not shown."""
    env = {**os.environ, "HOME": "/proc/nonexistent"}
    env.pop("MPLCONFIGDIR", None)
    res = subprocess.run([sys.executable, "-m", "loratool", "-q", "analyze", demo / "base",
                          demo / "tuned", "--html", tmp_path / "a.html"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert (tmp_path / "a.html").is_file()
