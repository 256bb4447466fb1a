"""Writing checkpoints: shards, index, transformers compatibility, atomicity, refusals."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import tree

from loratool.errors import LoraToolError, OutputError
from loratool.io.staging import _umask
from loratool.io.tensors import open_checkpoint
from loratool.io.writer import CheckpointWriter, parse_size


def _write(out, state, **kw):
    with CheckpointWriter(out, **kw) as w:
        for name, t in state.items():
            w.add(name, t)
    return out


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500kb") == 500_000
    assert parse_size("1000") == 1000
    assert parse_size(" 1.5 MB ") == 1_500_000
    with pytest.raises(LoraToolError, match="cannot read size"):
        parse_size("five gigs")


def test_single_file_loads_in_safetensors_and_transformers(tmp_path, llama_dir, tiny_llama):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    state = tiny_llama.state_dict()
    out = _write(tmp_path / "out", state, copy_from=llama_dir)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]
    ref = load_file(out / "model.safetensors")
    assert all(torch.equal(ref[k], v) for k, v in state.items()) and set(ref) == set(state)
    m = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, tiny_llama(ids).logits)


def test_sharding_index_and_names(tmp_path, llama_dir, tiny_llama):
    from transformers import AutoModelForCausalLM

    state = tiny_llama.state_dict()
    limit = 50_000
    out = _write(tmp_path / "out", state, copy_from=llama_dir, max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    for s in shards:  # a shard passes the limit only when one tensor alone is larger
        infos = [i for i in open_checkpoint(out / s).infos()]
        size = sum(i.nbytes for i in infos)
        assert size <= limit or len(infos) == 1
    m = AutoModelForCausalLM.from_pretrained(out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_all_dtypes_round_trip(tmp_path):
    from safetensors.torch import load_file

    state = {str(dt): (torch.arange(12).reshape(3, 4) % 3).to(dt)
             for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                        torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool)}
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.zeros(0, 4)
    state["strided"] = torch.arange(20.0).reshape(4, 5).t()  # non-contiguous
    out = _write(tmp_path / "o", state)
    ref = load_file(out / "model.safetensors")
    ours = open_checkpoint(out)
    for k, v in state.items():
        assert torch.equal(ref[k], v) and ref[k].dtype == v.dtype, k
        assert torch.equal(ours.load(k), v), k


def test_exception_mid_write_leaves_nothing(tmp_path, tiny_llama):
    state = tiny_llama.state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", max_shard_size=20_000) as w:
            for i, (name, t) in enumerate(state.items()):
                w.add(name, t)
                if i == 7:
                    raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_interrupt_mid_write_leaves_nothing(tmp_path, tiny_llama):
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "out") as w:
            w.add("a", torch.zeros(10))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_sigterm_leaves_nothing(tmp_path):
    """A real `loratool` process killed with SIGTERM mid-write removes its temporary folder:
    the writer is slowed down so that the signal lands while shards are being written."""
    import signal
    import subprocess
    import sys
    import time

    code = f"""
import sys, time
import loratool.io.writer as w
add = w.CheckpointWriter.add
def slow_add(self, name, t):
    add(self, name, t)
    print("writing", flush=True)
    time.sleep(60)
w.CheckpointWriter.add = slow_add
from loratool.cli import main
main(["demo", "--workdir", {str(tmp_path / 'demo')!r}])
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert any(n.endswith(".partial") for n in os.listdir(tmp_path / "demo"))
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 130
    time.sleep(0.1)
    assert sorted(os.listdir(tmp_path / "demo")) == [".loratool-demo"]


def test_existing_output_refused_then_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--force"):
        CheckpointWriter(out)
    # --force replaces outputs, never an unrelated folder
    with pytest.raises(OutputError, match="not a model or adapter .keep.txt."):
        CheckpointWriter(out, force=True)
    assert (out / "keep.txt").exists()
    (out / "config.json").write_text("{}")  # now it is (the remains of) a model folder
    _write(out, {"a": torch.ones(2)}, force=True)
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old folder is gone too


def test_output_that_is_or_overlaps_an_input_is_refused(tmp_path, llama_dir):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    for out in (d, d / "sub", tmp_path):
        with pytest.raises(OutputError, match="overlaps input"):
            CheckpointWriter(out, inputs=[d], force=True)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(OutputError, match="overlaps input"):
        CheckpointWriter(link, inputs=[d], force=True)


def test_copies_non_weight_files_only(tmp_path, sharded_dir):
    src = tmp_path / "src"
    shutil.copytree(sharded_dir, src)
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "README.md", ".gitattributes", "tokenizer.model"):
        (src / extra).write_text("x")
    (src / "pytorch_model.bin").write_bytes(b"junk")
    out = _write(tmp_path / "out", {"a": torch.ones(1)}, copy_from=src)
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"])


def test_duplicate_name_is_an_error(tmp_path):
    with pytest.raises(LoraToolError, match="twice"):
        with CheckpointWriter(tmp_path / "o") as w:
            w.add("a", torch.ones(1))
            w.add("a", torch.ones(1))
    assert os.listdir(tmp_path) == []


def test_force_swap_failure_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"old": torch.ones(2)})
    real = os.rename

    def failing(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OutputError, match="(?i)no space left"):
        _write(out, {"new": torch.zeros(2)}, force=True)
    monkeypatch.undo()
    assert list(open_checkpoint(out).tensors) == ["old"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_single_file_force_over_folder_and_file(tmp_path):
    out = tmp_path / "x.safetensors"
    out.mkdir()
    (out / "lora.safetensors").write_text("x")
    _write(out, {"a": torch.ones(1)}, single_file=True, force=True)
    assert out.is_file() and sorted(os.listdir(tmp_path)) == ["x.safetensors"]
    _write(out, {"b": torch.ones(1)}, single_file=True, force=True)
    assert list(open_checkpoint(out).tensors) == ["b"]


def test_planned_layout_writes_once_and_matches_streaming(tmp_path, tiny_llama):
    from loratool.io.tensors import dtype_code

    state = tiny_llama.state_dict()
    plan = [(k, dtype_code(v.dtype), tuple(v.shape)) for k, v in state.items()]
    a = _write(tmp_path / "a", state, max_shard_size=50_000)
    b = _write(tmp_path / "b", state, max_shard_size=50_000, plan=plan)
    assert tree(a) == tree(b)  # byte for byte the same files
    with pytest.raises(LoraToolError, match="planned layout"):
        _write(tmp_path / "c", {"x": torch.ones(3)}, plan=plan)
    assert not (tmp_path / "c").exists()


def test_missing_parents_are_created_and_removed_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "p" / "q" / "out") as w:
            w.add("a", torch.ones(1))
            raise RuntimeError("x")
    assert os.listdir(tmp_path) == []
    _write(tmp_path / "p" / "q" / "out", {"a": torch.ones(1)})
    mode = (tmp_path / "p" / "q" / "out").stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask()


def test_dot_output_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError):
        CheckpointWriter(".", force=True)


def test_model_folder_stays_whole(tmp_path, sharded_dir):
    """Subfolders travel (sentence-transformers' 1_Pooling/, a 2_Dense/ layer named in
    modules.json with its own weights); copies of the old weights in other formats do not."""
    src = tmp_path / "src"
    shutil.copytree(sharded_dir, src)
    files = {"1_Pooling/config.json": "{}", "2_Dense/config.json": "{}",
             "2_Dense/model.safetensors": "dense weights", "chat_template.jinja": "{{x}}",
             "onnx/model.onnx": "old graph", "onnx/config.json": "{}",
             "original/consolidated.00.pth": "old weights", "original/params.json": "{}",
             "openvino/openvino_model.bin": "old", ".git/HEAD": "ref", ".cache/x": "x"}
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "x.Dense"}]))
    w = CheckpointWriter(tmp_path / "out", copy_from=src)
    with w:
        w.add("a", torch.ones(1))
    got = set(tree(tmp_path / "out"))
    for rel in ("1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
                "chat_template.jinja", "modules.json", "onnx/config.json",
                "original/params.json"):
        assert rel in got, rel
    left = ["onnx/model.onnx", "openvino/openvino_model.bin", "original/consolidated.00.pth"]
    assert not got & set(left) and not any(r.startswith((".git", ".cache")) for r in got)
    assert sorted(w.not_copied) == left
