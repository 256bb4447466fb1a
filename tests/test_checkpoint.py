"""Reading checkpoints: every container, headers only, one tensor at a time."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from loratool.errors import FormatError
from loratool.headers.safetensors import read_safetensors_header
from loratool.io.tensors import open_checkpoint


def _same_state(ckpt, state: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.tensors) == set(state)
    for name, ref in state.items():
        info = ckpt.info(name)
        assert info.shape == tuple(ref.shape)
        assert info.nbytes == ref.numel() * ref.element_size()
        got = ckpt.load(name)
        assert got.dtype == ref.dtype
        assert torch.equal(got, ref), name


def test_single_file_folder(llama_dir, tiny_llama):
    ckpt = open_checkpoint(llama_dir)
    assert ckpt.container == "safetensors" and len(ckpt.files) == 1 and ckpt.index is None
    assert ckpt.config["model_type"] == "llama"
    _same_state(ckpt, tiny_llama.state_dict())


def test_single_file_path(llama_dir, tiny_llama):
    ckpt = open_checkpoint(llama_dir / "model.safetensors")
    _same_state(ckpt, tiny_llama.state_dict())


def test_sharded_folder(sharded_dir, tiny_llama):
    ckpt = open_checkpoint(sharded_dir)
    assert ckpt.index is not None and len(ckpt.files) > 2
    _same_state(ckpt, tiny_llama.state_dict())
    # the index file itself is also accepted as the path
    assert set(open_checkpoint(ckpt.index).tensors) == set(ckpt.tensors)


def test_bin_file_and_sharded_bin(bin_dir, sharded_bin_dir, tiny_llama):
    for d in (bin_dir, sharded_bin_dir):
        ckpt = open_checkpoint(d)
        assert ckpt.container == "pytorch"
        _same_state(ckpt, tiny_llama.state_dict())
    assert len(open_checkpoint(sharded_bin_dir).files) == 2


def test_adapter_folder(peft_dir):
    ckpt = open_checkpoint(peft_dir)
    assert ckpt.adapter_config["peft_type"] == "LORA"
    assert ckpt.files[0].name == "adapter_model.safetensors"
    assert any(".lora_A." in n for n in ckpt.tensors)


def test_load_casts_and_owns_its_memory(llama_dir):
    ckpt = open_checkpoint(llama_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    before = (llama_dir / "model.safetensors").read_bytes()
    t = ckpt.load(name, device="cpu", dtype=torch.float64)
    assert t.dtype == torch.float64
    t.add_(1.0)  # writing to a loaded tensor must never reach the file
    assert (llama_dir / "model.safetensors").read_bytes() == before
    assert not torch.equal(ckpt.load(name, dtype=torch.float64), t)


def test_listing_does_not_import_torch(sharded_dir):
    import subprocess
    import sys

    code = ("import sys; from loratool.headers.checkpoint import open_checkpoint; "
            "from loratool.headers.summary import summarize; "
            f"d = summarize(open_checkpoint({str(sharded_dir)!r})); "
            "assert d.num_tensors > 0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_header_of_our_own_parse_matches_safetensors(llama_dir):
    """The hand parser agrees with the safetensors library on every tensor."""
    from safetensors import safe_open

    infos, meta = read_safetensors_header(llama_dir / "model.safetensors")
    with safe_open(llama_dir / "model.safetensors", "pt") as f:
        assert {i.name for i in infos} == set(f.keys())
        assert meta == f.metadata()
        for i in infos:
            assert list(i.shape) == list(f.get_slice(i.name).get_shape())


def _write_raw(path, header: dict, data: bytes, pad: bool = True) -> None:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_gaps_and_trailing_bytes_are_refused_as_safetensors_refuses_them(tmp_path):
    from safetensors import SafetensorError, safe_open

    p = tmp_path / "x.safetensors"
    hdr = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    for data, msg in ((struct.pack("<ff", 9.0, 2.5), "belong to no tensor"),
                      (struct.pack("<fff", 9.0, 2.5, 1.0), "belong to no tensor")):
        _write_raw(p, hdr if len(data) == 8 else {"a": {"dtype": "F32", "shape": [2],
                                                         "data_offsets": [0, 8]}}, data)
        with pytest.raises(FormatError, match=msg):
            open_checkpoint(p)
        with pytest.raises(SafetensorError):  # the reference refuses the same files
            with safe_open(p, "pt") as f:
                f.get_tensor("a")


def test_index_decides_the_shard(tmp_path):
    """Two shards both holding 'a': the one the index names is read, as transformers does."""
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2), "b": torch.zeros(1)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.full((3,), 7.0), "c": torch.zeros(1)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}))
    ck = open_checkpoint(tmp_path)
    assert torch.equal(ck.load("a"), torch.ones(2)) and sorted(ck.tensors) == ["a", "b", "c"]


def test_folder_with_safetensors_and_pickles_prefers_safetensors(tmp_path, llama_dir,
                                                                  sharded_bin_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(sharded_bin_dir, d)
    shutil.copy(llama_dir / "model.safetensors", d)
    ck = open_checkpoint(d)
    assert ck.container == "safetensors" and ck.index is None


def test_single_file_ignores_a_broken_config_beside_it(tmp_path, llama_dir):
    import shutil

    shutil.copy(llama_dir / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    ck = open_checkpoint(tmp_path / "model.safetensors")
    assert ck.config is None and ck.adapter_config is None


def test_index_naming_missing_tensor(sharded_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"].values()))
    idx["weight_map"]["model.ghost.weight"] = first
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="ghost"):
        open_checkpoint(d)


def test_memory_stays_near_one_tensor(tmp_path):
    """Reading every tensor of a 192 MB checkpoint raises peak RSS by about one tensor (8 MB),
    not by the file size as a memory map would (file pages count in RSS)."""
    import subprocess
    import sys

    from loratool.io.writer import CheckpointWriter

    with CheckpointWriter(tmp_path / "big", max_shard_size="64MB") as w:
        for i in range(24):
            w.add(f"layers.{i}.weight", torch.full((2048, 1024), float(i)))
    code = f"""
import resource, torch
from loratool.io.tensors import open_checkpoint
ck = open_checkpoint({str(tmp_path / 'big')!r})
names = list(ck.tensors)
ck.load(names[0]).sum()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
total = 0.0
for n in names:
    total += float(ck.load(n, dtype=torch.float32).sum())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(total, (peak - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert float(out[0]) == sum(i * 2048 * 1024 for i in range(24))
    assert float(out[1]) < 40, f"peak RSS grew by {out[1]} MiB reading 192 MB"
