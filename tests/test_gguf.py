"""llama.cpp's GGUF: adapters written and read, merges into GGUF models quantized or not,
every architecture llama.cpp's name map knows. References: llama.cpp's own converters
(convert_lora_to_gguf.py, convert_hf_to_gguf.py), PEFT's deltas, and the gguf package's own
quantize/dequantize."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as T
from conftest import llama_cpp, needs_llama_cpp, run_cli, sentencepiece_tokenizer
from safetensors.torch import load_file

from loratool.formats.gguf_names import permute_rows

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# one tiny model per architecture family: (config class, model class, extra config)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 16}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 16}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"pad_token_id": 0, "bos_token_id": 1,
                                                "eos_token_id": 1}),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, {}),
    "olmo": (T.OlmoConfig, T.OlmoForCausalLM, {}),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {}),
    "starcoder2": (T.Starcoder2Config, T.Starcoder2ForCausalLM, {}),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, {}),
}


def _ok(*args: object) -> str:
    res = run_cli(*args)
    assert res.rc == 0, res.err
    return res.out


def _family(d: Path, name: str, seed: int = 0) -> tuple[Any, Path, Path]:
    """A tiny model of the family and a PEFT adapter on every linear layer of it."""
    from peft import LoraConfig, get_peft_model

    C, M, extra = FAMILIES[name]
    torch.manual_seed(seed)
    model = M(C(**SMALL, **extra)).eval()
    model.save_pretrained(d / "base")
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=linear, init_lora_weights=False))
    peft_model.save_pretrained(d / "adapter")
    return model, d / "base", d / "adapter"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


# --------------------------------------------------------------------------- adapters


@needs_llama_cpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_equals_llama_cpps_converter(tmp_path, family):
    """Names, q/k permutation, fused phi3 projections: the same file llama.cpp makes."""
    _, base, adapter = _family(tmp_path, family)
    llama_cpp("convert_lora_to_gguf.py", "--base", base, "--outfile", tmp_path / "ref.gguf",
              "--outtype", "f32", adapter)
    _ok("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "ours.gguf")
    ref, ours = _tensors(tmp_path / "ref.gguf"), _tensors(tmp_path / "ours.gguf")
    assert sorted(ref) == sorted(ours)
    assert [k for k in ref if not np.array_equal(ref[k], ours[k])] == []


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_peft_gguf_peft_round_trip(tmp_path, family):
    _, base, adapter = _family(tmp_path, family)
    _ok("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf")
    res = run_cli("convert", tmp_path / "a.gguf", "--to", "peft", "-o", tmp_path / "x")
    assert res.rc == 1 and "--base" in res.err  # llama.cpp's names need the model to map back
    _ok("convert", tmp_path / "a.gguf", "--to", "peft", "--base", base, "-o", tmp_path / "p")
    a = load_file(adapter / "adapter_model.safetensors")
    b = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit for bit (no rescale)
    info = json.loads(_ok("inspect", tmp_path / "a.gguf", "--json"))
    assert info["format"] == "gguf" and info["kind"] == "adapter"
    assert {m["scale"] for m in info["modules"]} == {2.0}


def test_gpt2_conv1d_layout(tmp_path):
    """GPT-2 keeps its projections [in, out] (Conv1D); llama.cpp stores them [out, in]. The
    GGUF adapter's B@A·s is PEFT's ΔW transposed (llama.cpp's own LoRA converter gets this
    wrong: it transposes the pair a second time)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
        fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    _ok("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o",
        tmp_path / "a.gguf")
    t = _tensors(tmp_path / "a.gguf")
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter")
    checked = 0
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            layer, kind = name.split(".h.")[1].split(".", 1)[0], name.rsplit(".", 1)[-1]
            g = {"c_attn": "attn_qkv", "c_fc": "ffn_up",
                 "c_proj": "attn_output" if ".attn." in name else "ffn_down"}[kind]
            key = f"blk.{layer}.{g}.weight"
            d = torch.from_numpy(t[key + ".lora_b"]) @ torch.from_numpy(t[key + ".lora_a"]) * 2
            assert torch.allclose(d, mod.get_delta_weight("default").T, atol=1e-6), key
            checked += 1
    assert checked == 8


def test_unknown_architecture_and_refused_modules(tmp_path):
    _, base, adapter = _family(tmp_path, "llama")
    cfg = json.loads((base / "config.json").read_text())
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({**cfg, "model_type": "nothing"}))
    for f in base.glob("*.safetensors"):
        (tmp_path / "odd" / f.name).write_bytes(f.read_bytes())
    res = run_cli("convert", adapter, "--to", "gguf", "--base", tmp_path / "odd", "-o",
                  tmp_path / "a.gguf")
    assert res.rc == 1 and "model_type 'nothing'" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "a.gguf").exists()


# --------------------------------------------------------------------------- GGUF models


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    """A tiny Llama, its GGUF model by llama.cpp's converter (F32 and Q8_0), and an
    adapter; the q/k rows of the GGUF model are permuted as llama.cpp permutes them."""
    if llama_cpp_dir_missing():
        pytest.skip("llama.cpp's converters (.ci/run unpacks them into .ci-llamacpp/)")
    d = tmp_path_factory.mktemp("gguf")
    model, base, adapter = _family(d, "llama", seed=3)
    sentencepiece_tokenizer(base)
    for t in ("f32", "q8_0"):
        llama_cpp("convert_hf_to_gguf.py", base, "--outfile", d / f"model-{t}.gguf",
                  "--outtype", t)
    return {"dir": d, "model": model, "base": base, "adapter": adapter}


def llama_cpp_dir_missing() -> bool:
    from conftest import llama_cpp_dir

    return llama_cpp_dir() is None


def _peft_deltas(model: Any, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW per adapted weight, in transformers' names."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(model), adapter)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = mod.get_delta_weight("default").detach().float()
    return out


def _gguf_name(hf: str, heads: tuple[int, int] = (4, 2), layers: int = 2) -> str:
    from loratool.formats.gguf_names import Arch

    tm = Arch("llama", layers, *heads).tensor_map()
    return tm.get_name(hf, try_suffixes=(".weight",))


def _to_gguf_layout(hf: str, t: torch.Tensor) -> torch.Tensor:
    if hf.endswith("q_proj.weight"):
        return permute_rows(t, 4)
    if hf.endswith("k_proj.weight"):
        return permute_rows(t, 2)
    return t


def test_merge_into_f32_gguf_is_the_safetensors_merge(llama_gguf, tmp_path):
    d = llama_gguf["dir"]
    _ok("merge", llama_gguf["base"], llama_gguf["adapter"], "-o", tmp_path / "m")
    _ok("merge", d / "model-f32.gguf", llama_gguf["adapter"], "-o", tmp_path / "m.gguf",
        "--verify")
    hf = load_file(tmp_path / "m" / "model.safetensors")
    got, base = _tensors(tmp_path / "m.gguf"), _tensors(d / "model-f32.gguf")
    changed = 0
    for name, t in hf.items():
        g = _gguf_name(name)
        want = _to_gguf_layout(name, t).numpy()
        assert np.array_equal(got[g], want), name  # bit for bit
        changed += not np.array_equal(base[g], want)
    assert changed == 14
    assert [n for n in base if not np.array_equal(base[n], got[n]) and "norm" in n] == []


@needs_llama_cpp
def test_rows_past_the_last_whole_block_merge_as_in_safetensors(tmp_path):
    """A GGUF merge adds ΔW a block of rows at a time (2¹⁸ values); with 512 columns that is
    512 rows, so a 1000-row ffn_up ends in a partial block of 488 (and ffn_down, 1000 wide,
    in one of 250 after 262): every value of both still equals the safetensors merge and
    PEFT's merge_and_unload."""
    from peft import PeftModel

    from loratool.verbs.gguf_requant import QUANT_CHUNK

    model = _one_layer_llama(tmp_path, 512, 1000, ["up_proj", "down_proj", "q_proj"], r=8)
    assert 1000 % (QUANT_CHUNK // 512) and 512 % (QUANT_CHUNK // 1000)
    llama_cpp("convert_hf_to_gguf.py", tmp_path / "base", "--outfile", tmp_path / "f32.gguf",
              "--outtype", "f32")
    _ok("merge", tmp_path / "f32.gguf", tmp_path / "adapter", "-o", tmp_path / "m.gguf")
    _ok("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m")
    hf = load_file(tmp_path / "m" / "model.safetensors")
    peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter"
                                     ).merge_and_unload().state_dict()
    got = _tensors(tmp_path / "m.gguf")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight"):
        g = _gguf_name(name, heads=(4, 2), layers=1)
        assert torch.equal(hf[name], peft[name]), name
        assert np.array_equal(got[g], _to_gguf_layout(name, hf[name]).numpy()), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"])
def test_merge_into_a_quantized_gguf(llama_gguf, tmp_path, qtype):
    """The merged tensors are quantize(dequantize(W) + ΔW) with gguf's own functions and
    PEFT's ΔW; every other tensor is the input's bytes."""
    import gguf

    d = llama_gguf["dir"]
    src = d / "model-q8_0.gguf"
    if qtype != "Q8_0":  # the same model in another type, made with gguf's own quantizer
        src = tmp_path / f"model-{qtype}.gguf"
        _requantize(d / "model-f32.gguf", src, qtype)
    _ok("merge", src, llama_gguf["adapter"], "-o", tmp_path / "m.gguf")
    reader = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    got = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    deltas = _peft_deltas(llama_gguf["model"], llama_gguf["adapter"])
    qt = gguf.GGMLQuantizationType[qtype]
    for hf, delta in deltas.items():
        g = _gguf_name(hf)
        W = gguf.quants.dequantize(np.array(reader[g].data), reader[g].tensor_type)
        want = gguf.quants.quantize((W + _to_gguf_layout(hf, delta).numpy()).astype(
            np.float32), qt)
        assert got[g].tensor_type == qt and np.array_equal(np.array(got[g].data), want), g
    for name, t in reader.items():
        if name not in {_gguf_name(h) for h in deltas}:
            assert np.array(got[name].data).tobytes() == np.array(t.data).tobytes(), name


def _requantize(src: Path, out: Path, qtype: str) -> None:
    """The GGUF model with its 2-D tensors in ``qtype`` (gguf's own quantizer)."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    _rewrite(src, out, lambda name, arr: (gguf.quants.quantize(arr, qt), qt) if arr.ndim == 2
             else (arr, None))


K_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _one_layer_llama(d: Path, hidden: int, intermediate: int, targets: list[str], r: int
                     ) -> Any:
    """A one-layer Llama in d/base (with a tokenizer for llama.cpp's converter) and a PEFT
    adapter with random factors on ``targets`` in d/adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**SMALL, "hidden_size": hidden,
                                                "intermediate_size": intermediate,
                                                "num_hidden_layers": 1})).eval()
    model.save_pretrained(d / "base")
    sentencepiece_tokenizer(d / "base")
    get_peft_model(copy.deepcopy(model), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    ).save_pretrained(d / "adapter")
    return model


def _k_quant_model(d: Path, kinds: dict[str, str] | None = None, default: str = "Q4_K",
                   file_type: int = 15) -> tuple[Any, Path, Path]:
    """A one-layer Llama as llama.cpp's converter writes it, then its matrices quantized as a
    Q4_K_M model's are (Q4_K, Q6_K attn_v and ffn_down, here one Q5_K too; or ``kinds`` by
    name and ``default`` for the rest), and a PEFT adapter on every projection."""
    import gguf

    from loratool.numerics.quant import quantize

    model = _one_layer_llama(d, 256, 512, K_TARGETS, r=4)
    llama_cpp("convert_hf_to_gguf.py", d / "base", "--outfile", d / "f32.gguf",
              "--outtype", "f32")
    if kinds is None:
        kinds = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "ffn_up": "Q5_K"}

    def k_quant(name: str, arr: np.ndarray) -> tuple[np.ndarray, Any]:
        if arr.ndim != 2 or name in ("token_embd.weight", "output.weight"):
            return arr, None
        t = next((t for k, t in kinds.items() if k in name), default)
        qt = gguf.GGMLQuantizationType[t]
        raw = np.frombuffer(quantize(torch.from_numpy(arr), t), dtype=np.uint8)
        return raw.reshape(gguf.quant_shape_to_byte_shape(arr.shape, qt)), qt

    _rewrite(d / "f32.gguf", d / "k.gguf", k_quant,
             {"general.file_type": file_type})  # 15: LLAMA_FTYPE_MOSTLY_Q4_K_M
    return model, d / "k.gguf", d / "adapter"


def _merged_exactly(model: Any, adapter: Path, src: Path) -> dict[str, tuple[torch.Tensor, Any]]:
    """deq(W) + ΔW (PEFT's ΔW, llama.cpp's layout) per changed tensor, and its type."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    out = {}
    for hf, delta in _peft_deltas(model, adapter).items():
        g = _gguf_name(hf, heads=(4, 2), layers=1)
        qt = tensors[g].tensor_type
        W = gguf.quants.dequantize(np.array(tensors[g].data), qt)
        out[g] = (torch.from_numpy((W + _to_gguf_layout(hf, delta).numpy()).astype(
            np.float32)), qt)
    return out


@needs_llama_cpp
def test_a_k_quant_model_is_merged_in_its_own_types(tmp_path):
    """A Q4_K_M-style model merged without --quant: each changed tensor is quantize(deq(W) +
    ΔW) in its own type with ggml's quantizer (test_kquants.py holds ggml's bytes for it), the
    file is the base's size and keeps its file type; --quant still picks another type and the
    header then says so."""
    import gguf

    from loratool.numerics.kquants import quantize_k

    model, src, adapter = _k_quant_model(tmp_path)
    out = _ok("merge", src, adapter, "-o", tmp_path / "m.gguf", "--verify")
    assert "7 of 12 tensors changed and re-quantized" in out, out
    assert (tmp_path / "m.gguf").stat().st_size == src.stat().st_size
    before = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    got = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    exact = _merged_exactly(model, adapter, src)
    assert len(exact) == 7
    for g, (merged, qt) in exact.items():
        assert got[g].tensor_type == qt, g
        assert np.array(got[g].data).tobytes() == quantize_k(merged, qt.name), g
    for name, t in before.items():
        if name not in exact:
            assert np.array(got[name].data).tobytes() == np.array(t.data).tobytes(), name

    def file_type(path: Path) -> int:
        return int(gguf.GGUFReader(str(path)).fields["general.file_type"].contents())

    assert file_type(tmp_path / "m.gguf") == 15
    _ok("merge", src, adapter, "-o", tmp_path / "q8.gguf", "--quant", "Q8_0", "--verify")
    assert file_type(tmp_path / "q8.gguf") == 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
    assert "MOSTLY_Q8_0" in _ok("inspect", tmp_path / "q8.gguf")
    q8 = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    assert q8["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@needs_llama_cpp
def test_an_iq4_model_is_merged_in_its_own_types(tmp_path):
    """IQ4_XS and IQ4_NL tensors (an IQ4_XS model with IQ4_NL where llama.cpp puts it for rows
    that are not whole super-blocks, here attn_v) stay in their types: each changed one is
    ggml's quantize_iq4_* of deq(W) + ΔW (test_kquants.py holds ggml's bytes), with and
    without an importance matrix, and the file is the base's size."""
    import gguf
    from test_kquants import write_imatrix_gguf

    from loratool.numerics.quant import quantize

    model, src, adapter = _k_quant_model(tmp_path, {"attn_v": "IQ4_NL"}, "IQ4_XS",
                                         file_type=30)  # LLAMA_FTYPE_MOSTLY_IQ4_XS
    sums = np.random.default_rng(5).uniform(0, 40, (1, 256)).astype(np.float32)
    write_imatrix_gguf(tmp_path / "im.gguf", {"blk.0.attn_q.weight": (sums, np.array([37.0])),
                                              "blk.0.attn_v.weight": (sums, np.array([37.0]))})
    exact = _merged_exactly(model, adapter, src)
    assert {qt.name for _, qt in exact.values()} == {"IQ4_XS", "IQ4_NL"}
    for name, extra in [("m.gguf", []), ("weighted.gguf", ["--imatrix", tmp_path / "im.gguf"])]:
        out = _ok("merge", src, adapter, "-o", tmp_path / name, "--verify", *extra)
        assert "7 of 12 tensors changed and re-quantized" in out, out
        assert (tmp_path / name).stat().st_size == src.stat().st_size
        got = {t.name: t for t in gguf.GGUFReader(str(tmp_path / name)).tensors}
        for g, (merged, qt) in exact.items():
            im = torch.from_numpy(sums.reshape(-1) / np.float32(37)) if extra and g in (
                "blk.0.attn_q.weight", "blk.0.attn_v.weight") else None
            assert got[g].tensor_type == qt, g
            assert np.array(got[g].data).tobytes() == quantize(merged, qt.name, im), g
    assert (tmp_path / "m.gguf").read_bytes() != (tmp_path / "weighted.gguf").read_bytes()


@needs_llama_cpp
def test_merge_with_an_importance_matrix(tmp_path):
    """--imatrix: a changed tensor the matrix has an entry for is quantized with it, as
    llama-quantize --imatrix does (quantize_q*_K with that entry: test_kquants.py checks those
    bytes against ggml's); one without an entry is quantized without; the report names both.
    A matrix of another model, a type loratool cannot weight and a safetensors base are one
    line each."""
    import gguf
    from test_kquants import write_imatrix_gguf

    from loratool.numerics.kquants import quantize_k

    model, src, adapter = _k_quant_model(tmp_path)
    rng = np.random.default_rng(3)
    weighted = {"blk.0.attn_q.weight": 256, "blk.0.ffn_down.weight": 512,
                "blk.0.ffn_up.weight": 256, "blk.0.attn_output.weight": 256}
    sums = {n: rng.uniform(0, 40, (1, c)).astype(np.float32) for n, c in weighted.items()}
    write_imatrix_gguf(tmp_path / "im.gguf", {n: (s, np.array([37.0])) for n, s in sums.items()})
    res = run_cli("merge", src, adapter, "-o", tmp_path / "m.gguf", "--imatrix",
                  tmp_path / "im.gguf", "--json")
    assert res.rc == 0, res.err
    report = json.loads(res.out)["imatrix_used"]
    assert report["used"] == sorted(weighted)
    assert report["no_entry"] == sorted(["blk.0.attn_k.weight", "blk.0.attn_v.weight",
                                         "blk.0.ffn_gate.weight"])
    got = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for g, (merged, qt) in _merged_exactly(model, adapter, src).items():
        im = None
        if g in sums:
            im = torch.from_numpy(sums[g].reshape(-1) / np.float32(37))  # float32 division
        assert np.array(got[g].data).tobytes() == quantize_k(merged, qt.name, im), g
    plain = _ok("merge", src, adapter, "-o", tmp_path / "plain.gguf")
    assert "importance matrix" not in plain
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "m.gguf").read_bytes()

    write_imatrix_gguf(tmp_path / "other.gguf", {"blk.0.attn_q.weight": (
        np.ones((1, 4096)), np.array([1.0]))})
    for args, says in [
        (["--imatrix", tmp_path / "other.gguf"], "4096 values and the tensor 256"),
        (["--imatrix", tmp_path / "im.gguf", "--quant", "Q4_0"], "leave out --imatrix"),
        (["--imatrix", tmp_path / "missing.gguf"], "missing.gguf"),
    ]:
        res = run_cli("merge", src, adapter, "-o", tmp_path / "x.gguf", *args)
        assert res.rc == 1 and says in res.err and res.err.count("\n") <= 1, res.err
        assert not (tmp_path / "x.gguf").exists()
    res = run_cli("merge", tmp_path / "base", adapter, "-o", tmp_path / "st", "--imatrix",
                  tmp_path / "im.gguf")
    assert res.rc == 1 and "--imatrix applies to merges into GGUF models" in res.err


def _rewrite(src: Path, out: Path, convert: Any, metadata: dict[str, int] | None = None
             ) -> None:
    """A copy of a GGUF model with each tensor passed through ``convert(name, array)``
    (returning the new array and its raw type, or None for a plain one), metadata kept
    (``metadata``: integer values replaced)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(out), "llama")
    for f in r.fields.values():
        if f.name in (metadata or {}):
            w.add_key_value(f.name, metadata[f.name], f.types[0])
        elif not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0],
                            f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        arr, raw = convert(t.name, np.array(t.data, dtype=np.float32))
        w.add_tensor(t.name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_adapter_merges_into_a_gguf_model(llama_gguf, tmp_path):
    """An adapter read from GGUF keeps llama.cpp's names and layout: it merges into the GGUF
    model as the PEFT adapter it came from does."""
    d = llama_gguf["dir"]
    _ok("convert", llama_gguf["adapter"], "--to", "gguf", "--base", llama_gguf["base"], "-o",
        tmp_path / "a.gguf")
    _ok("merge", d / "model-q8_0.gguf", tmp_path / "a.gguf", "-o", tmp_path / "m1.gguf")
    _ok("merge", d / "model-q8_0.gguf", llama_gguf["adapter"], "-o", tmp_path / "m2.gguf")
    assert (tmp_path / "m1.gguf").read_bytes() == (tmp_path / "m2.gguf").read_bytes()
    out = _ok("inspect", d / "model-q8_0.gguf")
    assert "MOSTLY_Q8_0" in out and "Q8_0" in out
    res = run_cli("unmerge", tmp_path / "m1.gguf", tmp_path / "a.gguf", "-o", tmp_path / "u")
    assert res.rc == 1 and "GGUF" in res.err


def test_moe_adapter_in_gguf(tmp_path):
    """A Mixtral target_parameters adapter: llama.cpp's own converter cannot convert it; ours
    writes 3-D expert factors (lora_a [E, r, in], lora_b [E, out, r]) whose products are
    PEFT's ΔW per expert, and reads them back into the same adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_local_experts=4,
                                                 num_experts_per_tok=2)).eval()
    model.save_pretrained(tmp_path / "base")
    get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ).save_pretrained(tmp_path / "adapter")
    _ok("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o",
        tmp_path / "a.gguf")
    t = _tensors(tmp_path / "a.gguf")
    assert t["blk.0.ffn_gate_exps.weight.lora_a"].shape == (4, 4, 64)
    assert t["blk.0.ffn_up_exps.weight.lora_b"].shape == (4, 128, 4)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    experts = pm.base_model.model.model.layers[1].mlp.experts
    gate_up = experts.base_layer.get_delta_weight("default")  # [E, 2I, H]
    down = experts.get_delta_weight("default")
    for key, want in (("blk.1.ffn_gate_exps", gate_up[:, :128]),
                      ("blk.1.ffn_up_exps", gate_up[:, 128:]), ("blk.1.ffn_down_exps", down)):
        got = torch.from_numpy(t[key + ".weight.lora_b"]) @ torch.from_numpy(
            t[key + ".weight.lora_a"]) * 2
        assert torch.allclose(got, want, atol=1e-6), key
    # inspect gives each expert module the shape of one expert's weight: in → out
    shown = json.loads(_ok("inspect", tmp_path / "a.gguf", "--json"))
    shapes = {m["name"]: (m["in_features"], m["out_features"], m.get("experts"))
              for m in shown["modules"] if m["name"].startswith("blk.0.")}
    assert shapes["blk.0.ffn_gate_exps"] == (64, 128, 4)
    assert shapes["blk.0.ffn_down_exps"] == (128, 64, 4)
    _ok("convert", tmp_path / "a.gguf", "--to", "peft", "--base", tmp_path / "base", "-o",
        tmp_path / "back")
    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the config says what the base says: the model it is for, and its task
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM", cfg
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base"), cfg


def test_quant_option_is_for_gguf(llama_gguf, tmp_path):
    res = run_cli("merge", llama_gguf["base"], llama_gguf["adapter"], "-o", tmp_path / "m",
                  "--quant", "Q8_0")
    assert res.rc == 1 and "--quant applies to GGUF" in res.err
    res = run_cli("merge", llama_gguf["dir"] / "model-f32.gguf", llama_gguf["adapter"], "-o",
                  tmp_path / "m")
    assert res.rc == 1 and ".gguf" in res.err


@needs_llama_cpp
def test_moe_merge_into_a_gguf_model(tmp_path):
    """Mixtral by llama.cpp's converter (experts stacked as ffn_*_exps), a PEFT
    target_parameters adapter merged into it: PEFT's merged experts, bit for bit."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_local_experts=4,
                                                 num_experts_per_tok=2)).eval()
    model.save_pretrained(tmp_path / "base")
    sentencepiece_tokenizer(tmp_path / "base")
    get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ).save_pretrained(tmp_path / "adapter")
    llama_cpp("convert_hf_to_gguf.py", tmp_path / "base", "--outfile", tmp_path / "f32.gguf",
              "--outtype", "f32")
    _ok("merge", tmp_path / "f32.gguf", tmp_path / "adapter", "-o", tmp_path / "m.gguf")
    got = _tensors(tmp_path / "m.gguf")
    ref = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter"
                                    ).merge_and_unload().state_dict()
    for layer in range(2):
        gate_up = ref[f"model.layers.{layer}.mlp.experts.gate_up_proj"].numpy()
        for key, want in (("ffn_gate_exps", gate_up[:, :128]), ("ffn_up_exps", gate_up[:, 128:]),
                          ("ffn_down_exps", ref[f"model.layers.{layer}.mlp.experts.down_proj"])):
            assert np.array_equal(got[f"blk.{layer}.{key}.weight"], np.asarray(want)), key
        q = ref[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert np.array_equal(got[f"blk.{layer}.attn_q.weight"], permute_rows(q, 4).numpy())


def test_combine_gguf_adapters(tmp_path):
    """Adapters read from GGUF combine under llama.cpp's names and stay GGUF; mixed with a
    PEFT adapter they need --base to be named alike."""
    _, base, adapter = _family(tmp_path, "qwen2")
    _ok("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf")
    _ok("combine", tmp_path / "a.gguf", tmp_path / "a.gguf", "--method", "cat", "--weight",
        "0.5", "--weight", "0.5", "-o", tmp_path / "c.gguf")
    _ok("merge", base, tmp_path / "c.gguf", "-o", tmp_path / "m1")
    _ok("merge", base, adapter, "-o", tmp_path / "m2")
    a, b = load_file(tmp_path / "m1" / "model.safetensors"), \
        load_file(tmp_path / "m2" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    res = run_cli("combine", tmp_path / "a.gguf", adapter, "--method", "cat", "-o",
                  tmp_path / "x.gguf")
    assert res.rc == 1 and "--base" in res.err
    _ok("combine", tmp_path / "a.gguf", adapter, "--method", "cat", "--base", base, "-o",
        tmp_path / "y.gguf")


def test_q8_0_in_torch_is_the_gguf_packages():
    """Q8_0 is quantized and dequantized in torch (fast); the bytes and values are the gguf
    package's own, on data from 1e-8 to 6e4, zero blocks, subnormal blocks and outliers."""
    import gguf

    from loratool.headers.safetensors import TensorInfo
    from loratool.numerics.quant import dequantize, quantize

    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for scale in (1e-8, 1e-5, 0.02, 1.0, 1e3, 6e4):
        x = (rng.standard_normal((64, 256)) * scale).astype(np.float32)
        x[0, :32], x[1, :32], x[2, 5] = 0.0, 1e-40, -10 * scale
        with np.errstate(all="ignore"):
            ref = gguf.quants.quantize(x, q8).tobytes()
        ours = quantize(torch.from_numpy(x), "Q8_0")
        assert ours == ref, scale
        back = dequantize(ours, TensorInfo("t", "Q8_0", (64, 256), len(ours), Path("t")))
        assert np.array_equal(back.numpy(), gguf.quants.dequantize(
            np.frombuffer(ref, np.uint8).reshape(64, -1), q8)), scale
    # every float32 within 4 ulps of each tie k + 0.5 (and of 0.5 from below, where adding
    # a half would round up), ±, in blocks led by 127 so that each value is its own n
    k = np.arange(128, dtype=np.float32) + np.float32(0.5)
    ulps = np.arange(-4, 5, dtype=np.int32)
    near = (k.view(np.int32)[:, None] + ulps[None, :]).view(np.float32).ravel()
    under = (np.float32(0.5).view(np.int32) - np.arange(1, 40, dtype=np.int32)).view(np.float32)
    vals = np.concatenate([near, under, -near, -under])
    vals = vals[np.abs(vals) < 127]
    vals = np.concatenate([vals, np.zeros(-len(vals) % (31 * 8), np.float32)]).reshape(-1, 31)
    x = np.concatenate([np.full((len(vals), 1), 127, np.float32), vals], 1).reshape(-1, 256)
    ref = gguf.quants.quantize(x, q8).tobytes()
    assert quantize(torch.from_numpy(x), "Q8_0") == ref


@pytest.mark.parametrize("model_file", ["model-q8_0.gguf", "model-f32.gguf"])
def test_a_peft_copy_of_the_head_merges_into_a_gguf_model(llama_gguf, tmp_path, model_file):
    """PEFT saves a copy of every modules_to_save module, trained or not: a head it did not
    train is the base's own (the same bytes in the GGUF tensor's type), left out and named;
    the merge is the adapter's without it. A head that changed is refused."""
    import json as _json

    from safetensors.torch import save_file

    d = llama_gguf["dir"]
    src = llama_gguf["adapter"]
    head = llama_gguf["model"].lm_head.weight.detach().clone()
    for name, t in (("copy", head), ("trained", head + 0.01)):
        (tmp_path / name).mkdir()
        tensors = load_file(src / "adapter_model.safetensors")
        tensors["base_model.model.lm_head.weight"] = t.contiguous()
        save_file(tensors, tmp_path / name / "adapter_model.safetensors")
        cfg = _json.loads((src / "adapter_config.json").read_text())
        cfg["modules_to_save"] = ["lm_head"]
        (tmp_path / name / "adapter_config.json").write_text(_json.dumps(cfg))
    res = run_cli("merge", d / model_file, tmp_path / "copy", "-o", tmp_path / "m.gguf",
                  "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["base_copies_left_out"] == ["output.weight"]
    _ok("merge", d / model_file, src, "-o", tmp_path / "plain.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    res = run_cli("merge", d / model_file, tmp_path / "trained", "-o", tmp_path / "t.gguf")
    assert res.rc == 1 and "differ from the base's" in res.err and "lm_head" in res.err, res.err
    assert not (tmp_path / "t.gguf").exists()


def test_a_base_quantized_with_an_importance_matrix_is_said_so(llama_gguf, tmp_path):
    """llama-quantize records the importance matrix it used (quantize.imatrix.*): a merge
    that re-quantizes K-quant tensors without one says so and how to pass it; a Q8_0 model
    (which ggml quantizes without importance anyway) and a model without that metadata say
    nothing."""
    import gguf

    def with_imatrix_metadata(src_path: Path, out: Path) -> Path:
        src = gguf.GGUFReader(str(src_path))
        w = gguf.GGUFWriter(str(out), "llama")
        for f in src.fields.values():
            if not f.name.startswith("GGUF.") and f.name != "general.architecture":
                w.add_key_value(f.name, f.contents(), f.types[0],
                                f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
        w.add_string("quantize.imatrix.file", "imatrix.dat")
        w.add_uint32("quantize.imatrix.chunks_count", 125)
        for t in src.tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return out

    _, k_model, adapter = _k_quant_model(tmp_path / "k")
    base = with_imatrix_metadata(k_model, tmp_path / "k-imatrix.gguf")
    res = run_cli("merge", base, adapter, "-o", tmp_path / "m.gguf", "--json")
    assert res.rc == 0, res.err
    note = json.loads(res.out)["imatrix"]
    assert "file imatrix.dat" in note and "chunks_count 125" in note, note
    assert "the 7 re-quantized tensor(s)" in note and "--imatrix FILE" in note, note
    for src in (with_imatrix_metadata(llama_gguf["dir"] / "model-q8_0.gguf",
                                      tmp_path / "q8-imatrix.gguf"), k_model):
        res = run_cli("merge", src, llama_gguf["adapter"] if "q8" in src.name else adapter,
                      "-o", tmp_path / "plain.gguf", "--json", "--force")
        assert res.rc == 0 and "imatrix" not in json.loads(res.out), res.err


@needs_llama_cpp
def test_k_quant_blocks_quantized_in_threads_are_the_same_bytes(tmp_path, monkeypatch):
    """With several quantizing threads (as many as torch's threads while a merge streams:
    half the cores, or OMP_NUM_THREADS, 3 here) the file is byte for byte the one-thread
    file, its blocks in order."""
    from loratool.verbs.gguf_requant import in_order

    assert list(in_order(lambda v: v * v, iter(range(50)), 3)) == [v * v for v in range(50)]
    model, src, adapter = _k_quant_model(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _ok("merge", src, adapter, "-o", tmp_path / "one.gguf")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _ok("merge", src, adapter, "-o", tmp_path / "three.gguf")
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "three.gguf").read_bytes()
