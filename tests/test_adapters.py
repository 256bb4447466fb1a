"""The adapter model and the PEFT reader/writer, against the real peft package."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import llama_config, run_cli, tiny_gpt2

from loratool.errors import FormatError
from loratool.formats import read_adapter
from loratool.io.tensors import open_checkpoint
from loratool.model.adapter import match_base


def _gpt2():
    return tiny_gpt2()


class Convs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.pw(self.conv(x)).mean((2, 3)))


CASES = {
    "lora+patterns": (lambda: _llama64(), dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 16})),
    "rslora+bias": (lambda: _llama64(attention_bias=True), dict(
        r=4, lora_alpha=8, target_modules=["o_proj"], use_rslora=True, lora_bias=True)),
    "gpt2-conv1d+embedding+modules_to_save": (_gpt2, dict(
        r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "wte"],
        modules_to_save=["ln_f"])),
    "conv": (lambda: Convs().eval(), dict(r=2, lora_alpha=3, target_modules=["conv", "pw"])),
}


def _llama64(**kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(**kw)).eval()


def _make(tmp_path, case: str, dtype=torch.float64):
    """A base model (float64, so merged − base is the exact delta) and a PEFT adapter of it."""
    from peft import LoraConfig, get_peft_model

    build, kw = CASES[case]
    base = build().to(dtype)
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():  # make modules_to_save differ from the base, as after training
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    return base, model


@pytest.mark.parametrize("case", list(CASES))
def test_dense_deltas_equal_peft_merge(tmp_path, case):
    """Our ΔW per module equals PEFT's merged − base weights (float64 model: exact to 1e-12)."""
    base, model = _make(tmp_path, case)
    ad = read_adapter(str(tmp_path / "adapter"))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    ref = base.state_dict()
    assert ad.modules
    for m in ad.modules.values():
        w = m.name + ".weight"
        want = merged[w] - ref[w]
        got = m.delta(torch.float64)
        assert got.shape == want.shape, m.name
        assert torch.allclose(got, want, rtol=0, atol=1e-12), m.name
        if m.bias is not None:
            b = m.name + ".bias"
            assert torch.allclose(m.scale * m.bias.double(), merged[b] - ref[b], atol=1e-12)
    for name, t in ad.full.items():
        assert torch.equal(t, merged[name]), name  # modules_to_save replace the base tensor
    kw = CASES[case][1]
    assert any(m.bias is not None for m in ad.modules.values()) == kw.get("lora_bias", False)
    assert bool(ad.full) == bool(kw.get("modules_to_save"))
    assert {m.rslora for m in ad.modules.values()} == {kw.get("use_rslora", False)}


def test_dora_magnitude_and_flags(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _llama64()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "dora")
    ad = read_adapter(str(tmp_path / "dora"))
    for name, module in model.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            m = ad.modules[name.removeprefix("base_model.model.")]
            assert torch.equal(m.magnitude, module.lora_magnitude_vector["default"].weight)
    assert all(m.magnitude is not None for m in ad.modules.values())


@pytest.mark.parametrize("case", list(CASES))
def test_written_peft_adapter_loads_in_peft_with_same_outputs(tmp_path, case):
    from peft import PeftModel

    base, model = _make(tmp_path, case, dtype=torch.float32)
    res = run_cli("convert", tmp_path / "adapter", "--to", "peft", "-o", tmp_path / "again")
    assert res.rc == 0, res.err
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    x = (torch.randn(2, 3, 12, 12) if case == "conv" else torch.tensor([[1, 5, 9, 3, 2]]))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    assert torch.equal(a, b)
    card = (tmp_path / "again" / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card


def test_config_keeps_original_targets_and_exact_patterns(tmp_path):
    _make(tmp_path, "lora+patterns")
    assert run_cli("convert", tmp_path / "adapter", "--to", "peft", "-o", tmp_path / "o").rc == 0
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert set(cfg["rank_pattern"].values()) == {2} and len(cfg["rank_pattern"]) == 2
    assert list(cfg["alpha_pattern"].values()) == [16]


def test_match_base_fixes_fan_in_fan_out_and_names_mismatch(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _gpt2()
    base.save_pretrained(tmp_path / "gpt2")
    get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, target_modules=["c_fc"], init_lora_weights=False)).save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = False  # as old PEFT versions saved it
    cfg_path.write_text(json.dumps(cfg))
    ad = read_adapter(str(tmp_path / "a"))
    assert {m.layout for m in ad.modules.values()} == {"linear"}
    mapping = match_base(ad, open_checkpoint(tmp_path / "gpt2"))
    assert {m.layout for m in ad.modules.values()} == {"fan_in_fan_out"}
    assert mapping["transformer.h.0.mlp.c_fc"] == "transformer.h.0.mlp.c_fc.weight"
    # an adapter for another model: the first bad module and both shapes are named
    from loratool.model.adapter import LoraModule

    ad.modules["transformer.h.0.mlp.c_fc"].A = torch.zeros(2, 40)
    with pytest.raises(FormatError, match=r"transformer.h.0.mlp.c_fc.*\[40, 128\].*\[32, 128\]"):
        match_base(ad, open_checkpoint(tmp_path / "gpt2"))
    ad.modules = {"x.y": LoraModule("x.y", torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}
    with pytest.raises(FormatError, match="has no tensor x.y.weight"):
        match_base(ad, open_checkpoint(tmp_path / "gpt2"))


def test_mergekit_style_adapter_reads(tmp_path):
    """mergekit's extract-lora folders: lora_alpha = r (scale 1) with equal rank/alpha
    patterns, bias deltas as lora_B.bias without the lora_bias flag, full embeddings and norms."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(attention_bias=True)).eval()
    p = "base_model.model.model.layers.0.self_attn."
    state = {p + "q_proj.lora_A.weight": torch.randn(8, 64), p + "q_proj.lora_B.weight":
             torch.randn(64, 8), p + "q_proj.lora_B.bias": torch.randn(64),
             p + "k_proj.lora_A.weight": torch.randn(4, 64), p + "k_proj.lora_B.weight":
             torch.randn(32, 4), "base_model.model.model.embed_tokens.weight":
             torch.randn(128, 64), "base_model.model.model.norm.weight": torch.randn(64)}
    d = tmp_path / "mk"
    d.mkdir()
    save_file(state, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "base", "peft_type": "LORA", "use_rslora": False,
        "target_modules": ["q_proj", "k_proj"], "modules_to_save": ["embed_tokens", "norm"],
        "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 8,
        "rank_pattern": {"model.layers.0.self_attn.k_proj": 4},
        "alpha_pattern": {"model.layers.0.self_attn.k_proj": 4}, "lora_dropout": 0.0,
        "fan_in_fan_out": False, "inference_mode": True}))
    ad = read_adapter(str(d))
    assert {m.scale for m in ad.modules.values()} == {1.0}
    assert ad.modules["model.layers.0.self_attn.q_proj"].bias is not None
    assert sorted(ad.full) == ["model.embed_tokens.weight", "model.norm.weight"]
    # written as PEFT it states lora_bias, and PEFT applies the bias as mergekit meant it
    assert run_cli("convert", d, "--to", "peft", "-o", tmp_path / "p").rc == 0
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and cfg["modules_to_save"] == ["model.embed_tokens",
                                                                   "model.norm"]
    merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").merge_and_unload()
    q = "model.layers.0.self_attn.q_proj"
    want_b = base.state_dict()[q + ".bias"] + state[p + "q_proj.lora_B.bias"]
    assert torch.allclose(merged.state_dict()[q + ".bias"], want_b, atol=1e-6)
    assert torch.equal(merged.state_dict()["model.norm.weight"],
                       state["base_model.model.model.norm.weight"])


def test_dora_written_loads_in_peft_and_survives_kohya(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _llama64()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True,
        init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "dora")
    assert run_cli("convert", tmp_path / "dora", "--to", "kohya", "-o",
                   tmp_path / "k.safetensors").rc == 0
    res = run_cli("convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "p")
    assert res.rc == 0, res.err
    orig, back = read_adapter(str(tmp_path / "dora")), read_adapter(str(tmp_path / "p"))
    for k, m in orig.modules.items():
        assert torch.equal(back.modules[k].magnitude, m.magnitude)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    res = run_cli("convert", tmp_path / "dora", "--to", "gguf", "-o", tmp_path / "a.gguf")
    assert res.rc == 1 and "DoRA magnitude" in res.err


def test_legacy_bin_adapter(tmp_path, peft_dir):
    from safetensors.torch import load_file

    d = tmp_path / "legacy"
    d.mkdir()
    torch.save(load_file(peft_dir / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    a, b = read_adapter(str(peft_dir)), read_adapter(str(d))
    assert set(a.modules) == set(b.modules)
    for k in a.modules:
        assert torch.equal(a.modules[k].delta(), b.modules[k].delta())
