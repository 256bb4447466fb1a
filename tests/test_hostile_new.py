"""Hostile inputs on the newest surfaces: llama.cpp importance matrices (merge --imatrix),
K-quant re-quantization, PEFT's other tuners and merge --qlora. Each bad input is one line
(exit 1) and writes nothing; an input that is valid gives a finite result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_hostile import _refused

# --------------------------------------------------------------------------- --imatrix, K-quants


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    """A one-layer Llama 256 wide as an F32 GGUF model (the gguf package's writer, llama.cpp's
    names) and a PEFT LoRA on its q_proj; ``poke(path, value)`` writes a copy whose
    blk.0.attn_q.weight holds ``value`` at one place."""
    import gguf
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("kq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)).eval()
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(d / "adapter")
    sd = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()
          if "lora_" not in k}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)

    def poke(path: Path, value: float | None = None) -> Path:
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_embedding_length(256)
        w.add_feed_forward_length(256)
        w.add_head_count(4)
        w.add_head_count_kv(4)
        w.add_context_length(32)
        for name, t in sd.items():
            name = name.replace(".base_layer", "")
            arr = t.float().numpy().copy()
            g = tmap.get_name(name, try_suffixes=(".weight",))
            if g == "blk.0.attn_q.weight" and value is not None:
                arr[3, 7] = value
            w.add_tensor(g, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    return d, poke(d / "f32.gguf"), d / "adapter", poke


def _imatrix(path: Path, values: np.ndarray, name: str = "blk.0.attn_q.weight") -> Path:
    from test_kquants import write_imatrix_gguf

    write_imatrix_gguf(path, {name: (values.reshape(1, -1), np.array([1.0]))})
    return path


@pytest.mark.parametrize("values, says", [
    (np.full(256, -1.0), "negative values"),
    (np.zeros(256), "all zeros"),
])
def test_an_imatrix_that_no_activations_give_is_refused(tmp_path, values, says):
    """Means of squares are never negative; all zero they make ggml write the tensor as
    zeros. Both used to merge, the second into a tensor of zeros."""
    from loratool.errors import FormatError
    from loratool.io.imatrix import read_imatrix

    with pytest.raises(FormatError, match=says):
        read_imatrix(_imatrix(tmp_path / "im.gguf", values))


def test_an_imatrix_of_another_model_is_refused(k_model, tmp_path):
    """No entry names a tensor of the model: it was computed for another one (it used to
    merge, weighting nothing)."""
    d, src, adapter, _ = k_model
    im = _imatrix(tmp_path / "im.gguf", np.ones(256), "model.layers.0.q_proj.weight")
    res = run_cli("merge", src, adapter, "-o", tmp_path / "m.gguf", "--quant", "Q4_K",
                  "--imatrix", im)
    _refused(res, "none of its 1 entries", "computed for this model")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("value, quant, imatrix", [
    (1e30, "Q4_K", None), (1e30, "Q6_K", None), (3e6, "Q2_K", None), (1e30, "Q4_0", None),
    (1e30, "F16", None), (None, "Q4_K", 3e38),
])
def test_a_quantization_that_overflows_writes_nothing(k_model, tmp_path, value, quant, imatrix):
    """A finite value (or importance) past what the type's float16 scales hold: the tensor
    would read back as Inf/NaN (llama-quantize's row validation refuses it too). It used to
    be written so, with numpy's overflow warnings for Q4_0 and F16."""
    d, _, adapter, poke = k_model
    src = poke(tmp_path / "base.gguf", value)
    extra = [] if imatrix is None else ["--imatrix", _imatrix(tmp_path / "im.gguf",
                                                              np.full(256, imatrix))]
    res = run_cli("merge", src, adapter, "-o", tmp_path / "m.gguf", "--quant", quant, *extra)
    _refused(res, "blk.0.attn_q.weight", f"written as {quant}", "Inf or NaN")
    assert not (tmp_path / "m.gguf").exists()
    ok = run_cli("merge", d / "f32.gguf", adapter, "-o", tmp_path / "ok.gguf", "--quant", quant,
                 "--json")
    assert ok.rc == 0 and json.loads(ok.out)["changed"], ok.err


# --------------------------------------------------------------------------- PEFT's other tuners


@pytest.fixture(scope="module")
def tuners(tmp_path_factory):
    """A tiny Llama and PEFT's own LoHa, LoKr, OFT, BOFT, AdaLoRA and IA³ adapters on it."""
    import copy

    import peft
    from test_peft_tuners import base_model, randomise, tuner_config

    d = tmp_path_factory.mktemp("tuners")
    base = base_model("llama")
    base.save_pretrained(d / "base")
    for i, kind in enumerate(["loha", "lokr", "oft", "boft", "adalora", "ia3"]):
        pm = peft.get_peft_model(copy.deepcopy(base), tuner_config(kind, "llama"))
        randomise(pm, i)
        pm.save_pretrained(d / kind)
    return d


def _hostile_copy(src: Path, dst: Path, config: dict | None = None,
                  tensor: tuple[str, object] | None = None) -> Path:
    """A copy of a PEFT adapter folder with config keys replaced and the first tensor whose
    name ends with ``tensor[0]`` replaced by ``tensor[1]``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor is not None:
        t = load_file(dst / "adapter_model.safetensors")
        key = next(k for k in sorted(t) if k.endswith(tensor[0]))
        t[key] = tensor[1]
        save_file(t, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("kind, config, says", [
    ("oft", {"num_cayley_neumann_terms": 10**9}, "more than 1000"),  # used to run for hours
    ("oft", {"num_cayley_neumann_terms": "five"}, "must be a positive integer"),  # ValueError
    ("oft", {"num_cayley_neumann_terms": -3}, "must be a positive integer"),  # merged as I
    ("oft", {"coft": True, "eps": "x"}, "eps must be a finite number"),  # ValueError
    ("oft", {"coft": True, "eps": -1}, "eps must be 0 or more"),
    ("oft", {"use_cayley_neumann": "no"}, "must be true or false"),  # read as true
    ("adalora", {"init_r": -1e-5}, "init_r must be a positive integer"),  # ZeroDivisionError
    ("adalora", {"init_r": 0}, "init_r must be a positive integer"),  # ΔW × 1e5
    ("loha", {"r": -4, "rank_pattern": {}}, "r must be a positive integer"),  # ΔW negated
    ("lokr", {"r": 0}, "r must be a positive integer"),  # merged as nothing
    ("loha", {"r": 10**30, "rank_pattern": {}}, "have rank 4"),  # merged as nothing
])
def test_a_tuner_config_that_lies_is_one_line(tuners, tmp_path, kind, config, says):
    """Settings PEFT's math reads that no PEFT run could have saved: refused by inspect and
    merge alike (they used to give an internal error, a hang, or a silently wrong merge)."""
    ad = _hostile_copy(tuners / kind, tmp_path / "ad", config)
    _refused(run_cli("inspect", ad), says)
    _refused(run_cli("merge", tuners / "base", ad, "-o", tmp_path / "m"), says)
    assert not (tmp_path / "m").exists()


def test_a_boft_adapter_of_no_factors_is_one_line(tuners, tmp_path):
    """boft_R with 0 butterfly factors used to end merge in an IndexError."""
    ad = _hostile_copy(tuners / "boft", tmp_path / "ad", tensor=("boft_R",
                                                                  torch.zeros(0, 32, 4, 4)))
    _refused(run_cli("merge", tuners / "base", ad, "-o", tmp_path / "m"), "do not fit together")


# --------------------------------------------------------------------------- merge --qlora


@pytest.fixture(scope="module")
def qlora_pair(tmp_path_factory):
    """A tiny Llama and a PEFT LoRA on it."""
    from peft import LoraConfig, get_peft_model
    from test_peft_tuners import base_model

    d = tmp_path_factory.mktemp("qlora")
    base = base_model("llama")
    base.save_pretrained(d / "base")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(d / "adapter")
    return d / "base", d / "adapter"


GOOD_QC = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.mark.parametrize("content, says", [
    ({**GOOD_QC, "llm_int8_skip_modules": [1, None]}, "not a list of module names"),
    ({**GOOD_QC, "llm_int8_skip_modules": ["("]}, "not a valid regular expression"),
    ({**GOOD_QC, "bnb_4bit_use_double_quant": "yes"}, "must be true or false"),  # read as no
    ("[" * 100000 + "]" * 100000, "nested too deeply"),  # RecursionError
    ("fifo", "named pipe"),  # read for ever
])
def test_a_hostile_qlora_config_is_one_line(qlora_pair, tmp_path, content, says):
    import os

    base, adapter = qlora_pair
    path = tmp_path / "qc.json"
    if content == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    res = run_cli("merge", base, adapter, "-o", tmp_path / "m", "--qlora", "auto",
                  "--qlora-config", path)
    _refused(res, says)
    assert not (tmp_path / "m").exists()


def test_a_qlora_base_with_nan_names_the_tensor(qlora_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base, adapter = qlora_pair
    shutil.copytree(base, tmp_path / "base")
    t = load_file(tmp_path / "base" / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(t, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    res = run_cli("merge", tmp_path / "base", adapter, "-o", tmp_path / "m", "--qlora", "nf4")
    _refused(res, "model.layers.0.self_attn.q_proj.weight holds NaN or Inf")


@pytest.mark.parametrize("kind, config, tensor, says", [
    ("adalora", {"lora_alpha": 1e308}, None, "its ΔW holds NaN or Inf"),  # LinAlgError
    ("lokr", {}, ("lokr_w1", torch.zeros(0, 8)), "do not fit together"),  # RuntimeError
])
def test_convert_of_a_tuner_that_cannot_be_factored_is_one_line(tuners, tmp_path, kind, config,
                                                                tensor, says):
    ad = _hostile_copy(tuners / kind, tmp_path / "ad", config, tensor)
    res = run_cli("convert", ad, "--to", "peft", "--rank", "2", "-o", tmp_path / "c")
    _refused(res, says)
    assert not (tmp_path / "c").exists()


def test_convert_of_a_huge_finite_change_is_one_line(tuners, tmp_path):
    """IA³'s l at 3e38: W·l − W is finite, but its SVD overflows (a LinAlgError before)."""
    from safetensors.torch import load_file, save_file

    ad = _hostile_copy(tuners / "ia3", tmp_path / "ad")
    t = load_file(ad / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, 3e38) for k, v in t.items()},
              ad / "adapter_model.safetensors")
    res = run_cli("convert", ad, "--to", "peft", "--rank", "2", "--base", tuners / "base",
                  "-o", tmp_path / "c")
    _refused(res, "cannot be factored")
    assert not (tmp_path / "c").exists()


def test_a_folder_or_missing_file_as_imatrix_or_qlora_config_is_one_line(tmp_path):
    """A folder, a missing file or a FIFO given where --imatrix or --qlora-config wants a
    file: one line, exit 1 (not click's usage error), before anything is loaded."""
    import os

    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for flag, extra in (("--imatrix", []), ("--qlora-config", ["--qlora", "auto"])):
        for given, says in (("folder", "is a folder"), ("missing", "missing"),
                            ("fifo", "named pipe")):
            res = run_cli("merge", "base", "adapter", "-o", tmp_path / "out", flag,
                          tmp_path / given, *extra)
            assert res.rc == 1 and says in res.err and res.err.count("\n") <= 1, (flag, res)
            assert not (tmp_path / "out").exists()
