"""``loratool inspect``: human and JSON output, adapters, --filter, --against."""

from __future__ import annotations

import copy
import json
import math
import shutil

import torch
from conftest import run_cli


def _json(*args):
    res = run_cli("inspect", *args, "--json")
    assert res.rc == 0, res.err
    return json.loads(res.out)


def test_json_schema_for_a_model(sharded_dir, tiny_llama):
    d = _json(sharded_dir)
    state = tiny_llama.state_dict()
    assert d["kind"] == "model" and d["format"] == "safetensors"
    assert d["architecture"] == "LlamaForCausalLM" and d["model_type"] == "llama"
    assert d["shards"] == len(list(sharded_dir.glob("model-*.safetensors")))
    assert d["index"] == "model.safetensors.index.json"
    assert d["num_tensors"] == len(state)
    assert d["total_params"] == sum(t.numel() for t in state.values())
    assert d["total_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert d["dtypes"] == {"F32": d["total_params"]}
    by_name = {t["name"]: t for t in d["tensors"]}
    assert set(by_name) == set(state)
    for name, t in state.items():
        e = by_name[name]
        assert e["shape"] == list(t.shape) and e["params"] == t.numel() and e["dtype"] == "F32"
    # tensors are listed in natural order: layers.2 before layers.10 (here: 0 before 1)
    names = [t["name"] for t in d["tensors"]]
    assert names.index("model.layers.0.mlp.up_proj.weight") < names.index(
        "model.layers.1.input_layernorm.weight")


def test_human_output_groups_layers(sharded_dir):
    res = run_cli("inspect", sharded_dir)
    assert res.rc == 0
    assert "model (safetensors), LlamaForCausalLM" in res.out
    assert "model.layers.*.self_attn.q_proj.weight" in res.out and "×2" in res.out
    assert "model.layers.0.self_attn.q_proj.weight" not in res.out
    expanded = run_cli("inspect", sharded_dir, "--all").out
    assert "model.layers.0.self_attn.q_proj.weight" in expanded
    assert "model.layers.1.self_attn.q_proj.weight" in expanded


def test_filter(llama_dir):
    d = _json(llama_dir, "--filter", "*.layers.1.*proj.weight", "--filter", "lm_head.*")
    names = sorted(t["name"] for t in d["tensors"])
    assert "lm_head.weight" in names and len(names) == 8
    assert all(n.startswith("model.layers.1.") for n in names if n != "lm_head.weight")
    assert d["num_tensors"] > len(names)  # totals still describe the whole checkpoint
    out = run_cli("inspect", llama_dir, "--filter", "*.layers.1.*proj.weight").out
    assert "model.layers.1.mlp.up_proj.weight" in out and "lm_head" not in out


def test_bin_checkpoint(bin_dir):
    d = _json(bin_dir)
    assert d["format"] == "pytorch" and d["kind"] == "model" and d["num_tensors"] > 0


def test_peft_adapter(peft_dir):
    """Ranks, alphas and scales per module follow PEFT's own loaded model."""
    from peft import PeftConfig

    d = _json(peft_dir)
    assert d["kind"] == "adapter" and d["format"] == "peft"
    a = d["adapter"]
    assert a["peft_type"] == "LORA" and a["r"] == 4 and a["lora_alpha"] == 8
    assert a["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    mods = {m["name"]: m for m in d["modules"]}
    assert len(mods) == 6
    q0, q1 = mods["model.layers.0.self_attn.q_proj"], mods["model.layers.1.self_attn.q_proj"]
    v0 = mods["model.layers.0.self_attn.v_proj"]
    assert (q0["rank"], q0["alpha"], q0["scale"]) == (4, 8, 2.0)
    assert (q1["rank"], q1["alpha"], q1["scale"]) == (4, 16, 4.0)
    assert (v0["rank"], v0["alpha"], v0["scale"]) == (2, 8, 4.0)
    assert q0["in_features"] == 64 and q0["out_features"] == 64 and q0["layout"] == "linear"
    # the reference: the scaling PEFT itself sets when it loads this adapter
    from conftest import llama_config
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = PeftModel.from_pretrained(LlamaForCausalLM(llama_config()), peft_dir)
    from peft.tuners.lora import LoraLayer

    seen = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            seen += 1
            key = name.removeprefix("base_model.model.")
            assert math.isclose(mods[key]["scale"], module.scaling["default"]), key
            assert mods[key]["rank"] == module.r["default"]
    assert seen == len(mods)
    assert PeftConfig.from_pretrained(peft_dir).r == 4
    human = run_cli("inspect", peft_dir).out
    assert "adapter (peft)" in human and "ranks: 2 ×2, 4 ×4" in human


def test_rslora_dora_adapter(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], use_rslora=True,
                     use_dora=True, init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_llama), cfg).save_pretrained(tmp_path / "a")
    d = _json(tmp_path / "a")
    m = d["modules"][0]
    assert m["rslora"] and m["dora"] and math.isclose(m["scale"], 8 / 2)
    assert "rsLoRA, DoRA" in run_cli("inspect", tmp_path / "a").out


def test_against(tmp_path, llama_dir, tiny_llama):
    from loratool.io.writer import CheckpointWriter

    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    name = "model.layers.1.mlp.up_proj.weight"
    delta = torch.randn_like(state[name]) * 0.01
    state[name] = state[name] + delta
    state["extra.weight"] = torch.ones(3)
    del state["model.norm.weight"]
    state["lm_head.weight"] = state["lm_head.weight"][:100]
    with CheckpointWriter(tmp_path / "tuned", copy_from=llama_dir) as w:
        for k, v in state.items():
            w.add(k, v)
    d = _json(llama_dir, "--against", tmp_path / "tuned")
    c = d["compare"]
    assert c["only_in_path"] == ["model.norm.weight"]
    assert c["only_in_other"] == ["extra.weight"]
    assert c["shape_mismatch"] == [{"name": "lm_head.weight", "shape": [128, 64],
                                    "other_shape": [100, 64]}]
    assert [x["name"] for x in c["changed"]] == [name]
    ref = tiny_llama.state_dict()[name].double()
    diff = (state[name].double() - ref)
    want = (diff.norm() / ref.norm()).item()
    assert math.isclose(c["changed"][0]["rel_diff"], want, rel_tol=1e-12)
    assert math.isclose(c["changed"][0]["max_abs_diff"], diff.abs().max().item(), rel_tol=1e-12)
    assert c["unchanged"] == c["compared"] - 2  # one changed, one of another shape
    human = run_cli("inspect", llama_dir, "--against", tmp_path / "tuned").out
    assert "1 changed" in human and name in human and "shape differs: lm_head.weight" in human


def test_against_itself_across_containers(llama_dir, bin_dir):
    d = _json(llama_dir, "--against", bin_dir)
    c = d["compare"]
    assert c["changed"] == [] and c["unchanged"] == c["compared"] == d["num_tensors"]


def test_adapter_listing_does_not_import_torch(peft_dir):
    import subprocess
    import sys

    code = ("import sys, json; from loratool.cli import main\n"
            f"try: main(['inspect', {str(peft_dir)!r}, '--json'])\n"
            "except SystemExit: pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert json.loads(res.stdout)["kind"] == "adapter"
    assert res.stderr.strip() == "False"


def test_missing_lora_alpha_means_peft_default_8(tmp_path, peft_dir):
    d = tmp_path / "a"
    shutil.copytree(peft_dir, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_alpha"], cfg["alpha_pattern"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    mods = {m["name"]: m for m in _json(d)["modules"]}
    assert mods["model.layers.0.self_attn.q_proj"]["scale"] == 2.0  # 8 / 4, as PEFT
    from loratool.formats import read_adapter

    assert read_adapter(str(d)).modules["model.layers.0.self_attn.q_proj"].scale == 2.0


def test_against_zero_norm_and_nan_stay_valid_json(tmp_path):
    from safetensors.torch import save_file

    nan = torch.tensor([1.0, float("nan")])
    save_file({"z": torch.zeros(4), "n": nan}, tmp_path / "a.safetensors")
    save_file({"z": torch.ones(4), "n": nan.clone()}, tmp_path / "b.safetensors")
    res = run_cli("inspect", tmp_path / "a.safetensors", "--against", tmp_path / "b.safetensors",
                  "--json")
    assert res.rc == 0, res.err
    c = json.loads(res.out)["compare"]  # json.loads would accept NaN; check the text too
    assert "NaN" not in res.out and "Infinity" not in res.out
    assert [x["name"] for x in c["changed"]] == ["z"] and c["changed"][0]["rel_diff"] is None
    assert c["unchanged"] == 1


def test_against_bf16_sums_match_float64(tmp_path):
    """bf16 checkpoints are compared in float32 chunks (the fast path): the norms still match
    a float64 computation to float32 rounding, and max |Δ| exactly."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(3000, 700, generator=g) * 0.02).bfloat16()
    b = (a.float() + torch.randn(3000, 700, generator=g) * 1e-3).bfloat16()
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    c = _json(tmp_path / "a.safetensors", "--against", tmp_path / "b.safetensors")["compare"]
    d = b.double() - a.double()
    row = c["changed"][0]
    assert math.isclose(row["diff_norm"], d.norm().item(), rel_tol=1e-6)
    assert math.isclose(row["norm"], a.double().norm().item(), rel_tol=1e-6)
    assert row["max_abs_diff"] == d.abs().max().item()
