"""Mixture-of-experts models: fused 3-D expert parameters (transformers 5), PEFT's
target_parameters adapters, per-expert and fused checkpoints. PEFT's own merge and dense
float64 SVDs are the references."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

E = 4  # experts


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
        num_experts_per_tok=2, max_position_embeddings=64)).eval()


def _qwen_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=E, num_experts_per_tok=2,
        max_position_embeddings=64, mlp_only_layers=[], decoder_sparse_step=1)).eval()


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen_moe}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny MoE model saved by transformers (one tensor per expert on disk), and a PEFT
    adapter on its fused expert parameters (target_parameters) and attention, with a
    rank_pattern and an alpha_pattern on an expert parameter."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp(request.param)
    model = FAMILIES[request.param]()
    model.save_pretrained(d / "base")
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                     rank_pattern={"layers.1.mlp.experts.down_proj": 2},
                     alpha_pattern={"layers.0.mlp.experts.gate_up_proj": 16},
                     init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(d / "adapter")
    return {"name": request.param, "dir": d, "model": model}


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _loaded(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as transformers holds it in memory (experts fused)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval().state_dict()


def _ok(*args: object) -> str:
    res = run_cli(*args)
    assert res.rc == 0, res.err
    return res.out


def test_merge_equals_peft_bit_for_bit(family, tmp_path):
    d = family["dir"]
    _ok("merge", d / "base", d / "adapter", "-o", tmp_path / "m", "--verify")
    ref, ours = _peft_merged(d / "base", d / "adapter"), _loaded(tmp_path / "m")
    assert ref.keys() == ours.keys()
    changed = [k for k in ref if not torch.equal(ref[k], family["model"].state_dict()[k])]
    assert any("experts.gate_up_proj" in k for k in changed)  # the test sees the experts
    assert [k for k in ref if not torch.equal(ref[k], ours[k])] == []
    # and back: the base within float32 rounding of W + ΔW − ΔW
    _ok("unmerge", tmp_path / "m", d / "adapter", "-o", tmp_path / "u")
    base, back = load_file(d / "base" / "model.safetensors"), \
        load_file(tmp_path / "u" / "model.safetensors")
    assert base.keys() == back.keys()
    for k in base:
        assert torch.allclose(base[k], back[k], atol=1e-6), k


def test_a_fused_checkpoint(family, tmp_path):
    """The same model stored as transformers holds it (3-D experts on disk)."""
    d = family["dir"]
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in family["model"].state_dict().items()},
              tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text((d / "base" / "config.json").read_text())
    _ok("merge", tmp_path / "fused", d / "adapter", "-o", tmp_path / "m")
    ref, ours = _peft_merged(d / "base", d / "adapter"), load_file(tmp_path / "m" /
                                                                   "model.safetensors")
    assert [k for k in ours if not torch.equal(ref[k], ours[k])] == []


def test_read_write_and_inspect(family, tmp_path):
    d = family["dir"]
    _ok("convert", d / "adapter", "--to", "peft", "-o", tmp_path / "c")
    a = load_file(d / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "c" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads(_ok("inspect", d / "adapter", "--json"))
    mods = {m["name"]: m for m in info["modules"]}
    gu = mods["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gu["experts"], gu["rank"], gu["scale"]) == (E, 4, 16 / 4)
    assert mods["model.layers.1.mlp.experts.down_proj"]["rank"] == 2
    assert "experts ×4" in _ok("inspect", d / "adapter")
    res = run_cli("convert", d / "adapter", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.rc == 1 and "mixture-of-experts parameters" in res.err


def _planted(model, seed: int, k: int = 3) -> dict[str, torch.Tensor]:
    """The model's in-memory weights, each expert's gate/up/down matrix changed by its own
    rank-k update plus noise (and attention too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {n: t.clone() for n, t in model.state_dict().items()}
    for n, t in sd.items():
        if "layers" not in n or t.dim() < 2 or n.endswith("mlp.gate.weight"):
            continue
        for W in (t if t.dim() == 3 else t[None]):  # one update per expert
            d = torch.randn(W.shape[0], k, generator=g) @ torch.randn(k, W.shape[1],
                                                                       generator=g)
            d *= 0.05 * W.norm() / d.norm()
            noise = torch.randn(W.shape, generator=g)
            W += d + noise * (0.02 * d.norm() / noise.norm())
    return sd


def test_extract_is_near_the_optimum_and_loads_in_peft(family, tmp_path):
    d = family["dir"]
    tuned = copy.deepcopy(family["model"])
    tuned.load_state_dict(_planted(family["model"], 3))
    tuned.save_pretrained(tmp_path / "tuned")
    rank = 5
    rep = json.loads(_ok("extract", d / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
                         "--rank", str(rank), "--json"))
    base_sd, tuned_sd = family["model"].state_dict(), tuned.state_dict()
    entries = {m["name"]: m for m in rep["modules"]}
    seen = 0
    for name, W in base_sd.items():
        if W.dim() != 3:
            continue
        for e in range(W.shape[0]):  # each expert's ΔW (gate and up rows together)
            D = tuned_sd[name][e].double() - W[e].double()
            s = torch.linalg.svdvals(D)
            optimum = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
            assert entries[f"{name}[{e}]"]["rel_error"] <= 1.01 * optimum
            seen += 1
    assert seen == 2 * 2 * E
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert len(cfg["target_parameters"]) == 4 and not any(
        "experts" in t for t in cfg["target_modules"])
    # PEFT loads it as it is; its merge is ours, bit for bit, and close to the fine-tune
    _ok("merge", d / "base", tmp_path / "ad", "-o", tmp_path / "m")
    ref = _peft_merged(d / "base", tmp_path / "ad")
    ours = _loaded(tmp_path / "m")
    assert [k for k in ref if not torch.equal(ref[k], ours[k])] == []
    for k in ref:
        if ref[k].dim() == 3:
            err = (ref[k] - tuned_sd[k]).norm() / (tuned_sd[k] - base_sd[k]).norm()
            assert err < 0.05, k


@pytest.mark.parametrize("policy", [("--energy", "0.9"), ("--budget", "9000")])
def test_experts_of_a_parameter_share_a_rank(family, tmp_path, policy):
    d = family["dir"]
    tuned = copy.deepcopy(family["model"])
    tuned.load_state_dict(_planted(family["model"], 4))
    tuned.save_pretrained(tmp_path / "tuned")
    rep = json.loads(_ok("extract", d / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
                         *policy, "--skip-full", "--json"))
    if policy[0] == "--budget":
        assert rep["totals"]["parameters"] <= 9000
    else:
        for m in rep["modules"]:
            assert m["kept_energy"] >= 0.9 - 1e-9, m["name"]
    from loratool.formats import read_adapter

    ad = read_adapter(str(tmp_path / "ad"))
    mods = [m for m in ad.modules.values() if m.experts]
    assert mods and all(m.A.shape[0] == E for m in mods)
    _ok("merge", d / "base", tmp_path / "ad", "-o", tmp_path / "m")
    ref = _peft_merged(d / "base", tmp_path / "ad")
    assert [k for k, v in _loaded(tmp_path / "m").items() if not torch.equal(ref[k], v)] == []


def test_combine_and_resize(family, tmp_path):
    d = family["dir"]
    _ok("combine", d / "adapter", d / "adapter", "--method", "cat", "--weight", "0.5",
        "--weight", "0.25", "-o", tmp_path / "cat")
    _ok("merge", d / "base", tmp_path / "cat", "-o", tmp_path / "m1")
    _ok("merge", d / "base", d / "adapter", "--weight", "0.75", "-o", tmp_path / "m2")
    a, b = _loaded(tmp_path / "m1"), _loaded(tmp_path / "m2")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    rep = json.loads(_ok("resize", d / "adapter", "--budget", "3000", "-o",
                         tmp_path / "r", "--json"))
    assert rep["totals"]["parameters"] <= 3000
    _ok("merge", d / "base", tmp_path / "r", "-o", tmp_path / "m3")  # PEFT loads it too
    ref = _peft_merged(d / "base", tmp_path / "r")
    assert [k for k, v in _loaded(tmp_path / "m3").items() if not torch.equal(ref[k], v)] == []


def test_analyze_an_experts_adapter(family):
    d = family["dir"]
    rep = json.loads(_ok("analyze", d / "adapter", "--json"))
    names = [m["name"] for m in rep["modules"]]
    assert f"model.layers.0.mlp.experts.gate_up_proj[{E - 1}]" in names
    assert all(m["effective_rank"]["0.99"] <= 4 for m in rep["modules"])


def test_peft_wrappers_in_another_order_are_refused(family, tmp_path):
    """gate_up_proj and down_proj factors swapped: the shapes tell, and the error says so."""
    d = family["dir"]
    sd = load_file(d / "adapter" / "adapter_model.safetensors")
    out = tmp_path / "swapped"
    out.mkdir()
    swapped = {}
    for k, v in sd.items():
        if ".experts.base_layer." in k:
            swapped[k.replace(".experts.base_layer.", ".experts.")] = v
        elif ".experts." in k:
            swapped[k.replace(".experts.", ".experts.base_layer.")] = v
        else:
            swapped[k] = v
    save_file(swapped, out / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    cfg["rank_pattern"], cfg["alpha_pattern"] = {}, {}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_cli("convert", out, "--to", "peft", "-o", tmp_path / "c")
    assert res.rc == 1 and "PEFT's order" in res.err and "Traceback" not in res.err
