"""convert: round trips between formats, GGUF read back with gguf's own reader, lossy refusals,
and every bad adapter input."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import llama_config, run_cli, tree

from loratool.formats import read_adapter
from loratool.io.tensors import open_checkpoint


def _deltas(ad):
    return {m.name: m.delta(torch.float64) for m in ad.modules.values()}


def _same_deltas(a, b, atol=1e-6):
    da, db = _deltas(a), _deltas(b)
    assert set(da) == set(db)
    for k in da:
        assert torch.allclose(da[k], db[k], rtol=0, atol=atol), k


@pytest.fixture(scope="module")
def rslora_dir(tmp_path_factory, tiny_llama):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    d = tmp_path_factory.mktemp("rslora")
    get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "up_proj"],
        rank_pattern={"up_proj": 8}, init_lora_weights=False)).save_pretrained(d)
    return d


@pytest.mark.parametrize("fixture", ["peft_dir", "rslora_dir"])
@pytest.mark.parametrize("via", ["kohya", "diffusers"])
def test_round_trip_keeps_dense_deltas(tmp_path, request, fixture, via):
    src = request.getfixturevalue(fixture)
    mid = tmp_path / ("mid.safetensors" if via == "kohya" else "mid")
    res = run_cli("convert", src, "--to", via, "-o", mid)
    assert res.rc == 0, res.err
    back = tmp_path / "back"
    res = run_cli("convert", mid, "--to", "peft", "-o", back)
    assert res.rc == 0, res.err
    orig, mid_ad, again = read_adapter(str(src)), read_adapter(str(mid)), read_adapter(str(back))
    assert mid_ad.source_format == via
    _same_deltas(orig, mid_ad)
    _same_deltas(orig, again)
    for m in again.modules.values():  # factors themselves are kept bit for bit
        o = orig.modules[m.name]
        assert torch.equal(m.A, o.A) and torch.equal(m.B, o.B)


def test_kohya_names_resolve_against_base_when_not_recorded(tmp_path, peft_dir, llama_dir):
    """A kohya file from elsewhere has no record of the dotted names: --base resolves them."""
    from safetensors.torch import load_file, save_file

    assert run_cli("convert", peft_dir, "--to", "kohya", "-o", tmp_path / "k.safetensors").rc == 0
    state = load_file(tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_model_layers_") for k in state)
    save_file(state, tmp_path / "foreign.safetensors", metadata={"ss_network_dim": "4"})
    res = run_cli("convert", tmp_path / "foreign.safetensors", "--to", "peft", "-o",
                  tmp_path / "p")
    assert res.rc == 1 and "pass --base" in res.err
    assert not (tmp_path / "p").exists()
    res = run_cli("convert", tmp_path / "foreign.safetensors", "--to", "peft", "-o",
                  tmp_path / "p", "--base", llama_dir)
    assert res.rc == 0, res.err
    _same_deltas(read_adapter(str(peft_dir)), read_adapter(str(tmp_path / "p")))
    # kohya → kohya needs no names at all, and keeps the header metadata
    res = run_cli("convert", tmp_path / "foreign.safetensors", "--to", "kohya", "-o",
                  tmp_path / "k2.safetensors")
    assert res.rc == 0, res.err
    assert open_checkpoint(tmp_path / "k2.safetensors").metadata["ss_network_dim"] == "4"


def test_kohya_file_layout_and_alpha(tmp_path, rslora_dir):
    from safetensors import safe_open

    out = tmp_path / "k.safetensors"
    assert run_cli("convert", rslora_dir, "--to", "kohya", "-o", out).rc == 0
    orig = read_adapter(str(rslora_dir))
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        m = orig.modules["model.layers.0.self_attn.k_proj"]
        stem = "lora_unet_model_layers_0_self_attn_k_proj"
        assert {stem + s for s in (".lora_down.weight", ".lora_up.weight", ".alpha")} <= keys
        alpha = f.get_tensor(stem + ".alpha").item()
        # kohya's scale is alpha / r: rsLoRA's alpha / sqrt(r) is restated
        assert math.isclose(alpha / m.rank, m.alpha / math.sqrt(m.rank), rel_tol=1e-6)
        assert f.metadata()["ss_network_module"] == "networks.lora"


def test_diffusers_file_has_prefixes_and_metadata(tmp_path, peft_dir):
    from safetensors import safe_open

    assert run_cli("convert", peft_dir, "--to", "diffusers", "-o", tmp_path / "d").rc == 0
    path = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8


def _unpermute(w, n_head):
    # inverse of llama.cpp's permute: (n_head, half, 2, …) back to (n_head, 2, half, …)
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_gguf_read_back_with_gguf_reader(tmp_path, peft_dir, llama_dir):
    import gguf

    out = tmp_path / "adapter.gguf"
    res = run_cli("convert", peft_dir, "--to", "gguf", "-o", out)
    assert res.rc == 1 and "--base" in res.err and not out.exists()
    res = run_cli("convert", peft_dir, "--to", "gguf", "-o", out, "--base", llama_dir)
    assert res.rc == 0, res.err
    r = gguf.GGUFReader(out)
    fields = {k: f for k, f in r.fields.items()}

    def field(k):
        f = fields[k]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    alpha = field("adapter.lora.alpha")
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in r.tensors}
    orig = read_adapter(str(peft_dir))
    cfg = json.loads((llama_dir / "config.json").read_text())
    names = {"q_proj": "attn_q", "v_proj": "attn_v", "down_proj": "ffn_down"}
    assert len(tensors) == 2 * len(orig.modules)
    for m in orig.modules.values():
        layer, kind = m.name.split(".")[2], m.name.rsplit(".", 1)[1]
        g = f"blk.{layer}.{names[kind]}.weight"
        a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
        assert tuple(a.shape) == tuple(m.A.shape) and tuple(b.shape) == tuple(m.B.shape)
        if kind == "q_proj":
            b = _unpermute(b, cfg["num_attention_heads"])
        # llama.cpp applies alpha / r with r from the tensor shape
        got = (alpha / a.shape[0]) * (b @ a)
        assert torch.allclose(got, m.delta(torch.float64), rtol=0, atol=1e-6), m.name


def test_lossy_conversion_refused_then_dropped_on_request(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(llama_config()), LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    before = tree(tmp_path)
    res = run_cli("convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.rc == 1 and "would lose 1 full tensors (modules_to_save)" in res.err
    assert "--drop-unsupported" in res.err and tree(tmp_path) == before
    res = run_cli("convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors",
                  "--drop-unsupported")
    assert res.rc == 0 and "dropped (--drop-unsupported): 1 full tensors" in res.out
    assert len(read_adapter(str(tmp_path / "k.safetensors")).modules) == 2


def test_inspect_shows_every_format(tmp_path, peft_dir):
    for fmt, out in (("kohya", tmp_path / "k.safetensors"), ("diffusers", tmp_path / "d")):
        assert run_cli("convert", peft_dir, "--to", fmt, "-o", out).rc == 0
        res = run_cli("inspect", out, "--json")
        assert res.rc == 0, res.err
        d = json.loads(res.out)
        assert d["kind"] == "adapter" and d["format"] == fmt
        mods = {m["name"].removeprefix("transformer."): m for m in d["modules"]}
        assert len(mods) == 6
        q1 = mods["model.layers.1.self_attn.q_proj"]
        assert (q1["rank"], q1["alpha"], q1["scale"]) == (4, 16, 4.0)
        human = run_cli("inspect", out).out
        assert f"adapter ({fmt})" in human


# --------------------------------------------------------------------------- bad input


def _bad(tmp_path, src, *needles):
    before = tree(tmp_path)
    res = run_cli("convert", src, "--to", "kohya", "-o", tmp_path / "out.safetensors")
    assert res.rc == 1, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error: "), res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert tree(tmp_path) == before


def _copy(peft_dir, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(peft_dir, d)
    return d


def _edit_weights(d, fn):
    from safetensors.torch import load_file, save_file

    p = d / "adapter_model.safetensors"
    state = load_file(p)
    fn(state)
    save_file(state, p)


def test_bad_a_without_b(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_weights(d, lambda s: s.pop(key))
    _bad(tmp_path, d, "model.layers.0.self_attn.q_proj", "has lora_A but no lora_B")


def test_bad_rank_mismatch(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_weights(d, lambda s: s.__setitem__(key, torch.zeros(64, 3)))
    _bad(tmp_path, d, "rank of A (4", "rank of B (3")


def test_bad_alpha_not_a_number(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = "sixteen"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _bad(tmp_path, d, "lora_alpha must be a finite number", "sixteen")


def test_bad_config_without_r(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["r"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _bad(tmp_path, d, "no 'r'")


def test_bad_nan_in_factor(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"

    def poison(s):
        s[key] = s[key].clone()
        s[key][0, 0] = float("nan")

    _edit_weights(d, poison)
    _bad(tmp_path, d, "model.layers.1.mlp.down_proj", "NaN or Inf")


def test_bad_model_checkpoint_as_adapter(tmp_path, llama_dir):
    _bad(tmp_path, llama_dir, "is a model checkpoint, not an adapter")


def test_bad_unknown_key_pattern(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    _edit_weights(d, lambda s: s.__setitem__("base_model.model.x.hada_w1_a", torch.zeros(2, 2)))
    _bad(tmp_path, d, "unknown key pattern", "hada_w1_a")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_x.lokr_w1": torch.zeros(2, 2)}, tmp_path / "k.safetensors")
    _bad(tmp_path, tmp_path / "k.safetensors", "mixes the tensors of several LyCORIS types",
         "lokr_w1")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_x.lora_gate": torch.zeros(2)}, tmp_path / "g.safetensors")
    _bad(tmp_path, tmp_path / "g.safetensors", "unknown key pattern", "lora_gate")


def test_bad_conflicting_formats_in_one_folder(tmp_path, peft_dir):
    d = _copy(peft_dir, tmp_path)
    shutil.copy(d / "adapter_model.safetensors", d / "pytorch_lora_weights.safetensors")
    _bad(tmp_path, d, "several formats", "PEFT", "diffusers")


def test_bad_mixed_key_styles_in_one_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "base_model.model.y.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.y.lora_B.weight": torch.zeros(4, 2)}, tmp_path / "m.safetensors")
    _bad(tmp_path, tmp_path / "m.safetensors", "mixes kohya")


def test_bad_kohya_alpha_not_a_number(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_x.alpha": torch.tensor(float("inf"))}, tmp_path / "k.safetensors")
    _bad(tmp_path, tmp_path / "k.safetensors", "alpha", "not a finite number")


def test_kohya_missing_or_zero_alpha_means_rank(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4),
               "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               "lora_unet_y.lora_down.weight": torch.ones(2, 4),
               "lora_unet_y.lora_up.weight": torch.ones(4, 2),
               "lora_unet_y.alpha": torch.tensor(0.0)}, tmp_path / "k.safetensors")
    ad = read_adapter(str(tmp_path / "k.safetensors"))
    assert {m.scale for m in ad.modules.values()} == {1.0}


def test_gguf_as_llama_cpp_reads_it(tmp_path, tiny_llama, llama_dir):
    """Embedding LoRA in llama.cpp's layout, PEFT's base_layer copies left out as llama.cpp's
    converter leaves them, and base-model metadata only for a Hub id."""
    import gguf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"],
        init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    saved = open_checkpoint(tmp_path / "a").tensors
    assert any(".base_layer." in n for n in saved)  # the copies PEFT adds
    merged = model.merge_and_unload().state_dict()
    res = run_cli("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "a.gguf",
                  "--base", llama_dir)
    assert res.rc == 0, res.err
    assert "equal to the base" in res.out and "nothing rescaled" in res.out
    r = gguf.GGUFReader(tmp_path / "a.gguf")
    assert not [k for k in r.fields if k.startswith("general.base_model")]  # a local base
    t = {x.name: torch.from_numpy(x.data.copy()).double() for x in r.tensors}
    alpha = float(r.fields["adapter.lora.alpha"].parts[-1][0])
    a, b = t["token_embd.weight.lora_a"], t["token_embd.weight.lora_b"]
    assert tuple(a.shape) == (128, 4) and tuple(b.shape) == (64, 4)  # [vocab, r], [dim, r]
    # llama.cpp: delta of token i = scale · lora_b @ lora_a[i]
    want = merged["model.embed_tokens.weight"].double() - tiny_llama.state_dict()[
        "model.embed_tokens.weight"].double()
    assert torch.allclose(alpha / 4 * a @ b.T, want, atol=1e-6)
    a, b = t["output.weight.lora_a"], t["output.weight.lora_b"]
    want = merged["lm_head.weight"].double() - tiny_llama.state_dict()["lm_head.weight"].double()
    assert torch.allclose(alpha / 4 * b @ a, want, atol=1e-6)
    # a Hub id as the base model: general.base_model.* as llama.cpp's converter writes it
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_cli("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "h.gguf",
                  "--base", llama_dir)
    assert res.rc == 0, res.err
    f = gguf.GGUFReader(tmp_path / "h.gguf").fields

    def text(k):
        return bytes(f[k].parts[f[k].data[0]]).decode()

    assert int(f["general.base_model.count"].parts[-1][0]) == 1
    assert text("general.base_model.0.repo_url") == "https://huggingface.co/meta-llama/Llama-3.2-1B"
    assert text("general.base_model.0.name") == "Llama-3.2-1B"


def test_gguf_refuses_what_llama_cpp_would_misapply(tmp_path, tiny_llama):
    """A tied base: llama.cpp has one tensor for embeddings and head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tied = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    tied.save_pretrained(tmp_path / "base")
    get_peft_model(copy.deepcopy(tied), LoraConfig(
        r=2, target_modules=["embed_tokens"], init_lora_weights=False)).save_pretrained(
        tmp_path / "a")
    before = tree(tmp_path)
    res = run_cli("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "a.gguf",
                  "--base", tmp_path / "base")
    assert res.rc == 1 and "ties its output layer" in res.err, res.err
    assert tree(tmp_path) == before
