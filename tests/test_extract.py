"""extract: planted deltas recovered, errors against the Eckart–Young optimum, policies."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import llama_config, run_cli, tiny_gpt2, tree

from loratool.formats import read_adapter


def _pair(tmp_path, rank=4, noise=0.0, dtype=torch.float32, targets=("q_proj", "v_proj",
                                                                     "down_proj"),
          seed=0, norm_change=False, ranks=None):
    """A tiny Llama base and a tuned copy: base + a planted rank-``rank`` delta (+ noise)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config()).to(dtype).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and any(t in name for t in targets):
                r = next((v for k, v in (ranks or {}).items() if k in name), rank)
                b = torch.randn(p.shape[0], r, generator=g, dtype=torch.float64)
                a = torch.randn(r, p.shape[1], generator=g, dtype=torch.float64)
                d = b @ a
                d *= 0.05 * p.double().norm() / d.norm()
                if noise:
                    n = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    d += n * (noise * d.norm() / n.norm())
                p.copy_((p.double() + d).to(dtype))
            if norm_change and name.endswith("model.norm.weight"):
                p.add_(0.1)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="100KB")
    return base, tuned


def _optimal_errors(base, tuned, name):
    """Eckart–Young: the best rank-k relative error, for every k, from a dense float64 SVD."""
    d = (tuned.state_dict()[name].double() - base.state_dict()[name].double())
    s = torch.linalg.svdvals(d)
    tail = torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0])  # Σ_{i≥k} σ²
    total = float(tail[0])
    return [math.sqrt(float(tail[k]) / total) if k < len(s) else 0.0
            for k in range(len(s) + 1)]


def test_planted_delta_recovered_and_peft_reproduces_tuned(tmp_path):
    from peft import PeftModel

    base, tuned = _pair(tmp_path)
    before = tree(tmp_path)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
                  "--rank", "4", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["totals"]["lora_modules"] == 6 and rep["totals"]["max_rel_error"] < 1e-5
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("ad")} == before
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    ids = torch.tensor([[1, 9, 4, 7, 2]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tuned(ids).logits, atol=1e-5)
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "rank policy: rank 4" in card and "seed 0" in card


def test_noisy_errors_within_one_percent_of_optimum(tmp_path):
    base, tuned = _pair(tmp_path, rank=8, noise=0.3)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
                  "--rank", "6", "--json")
    assert res.rc == 0, res.err
    for m in json.loads(res.out)["modules"]:
        opt = _optimal_errors(base, tuned, m["tensor"])[m["rank"]]
        assert m["rel_error"] <= 1.01 * opt, (m["name"], m["rel_error"], opt)
        assert m["rel_error"] >= opt * (1 - 1e-6)  # nobody beats Eckart–Young
    # the report's errors are the adapter's: recompute from the written factors
    ad = read_adapter(str(tmp_path / "ad"))
    for m in json.loads(res.out)["modules"]:
        d = tuned.state_dict()[m["tensor"]].double() - base.state_dict()[m["tensor"]].double()
        got = ad.modules[m["name"]].delta(torch.float64)
        assert math.isclose(float((d - got).norm() / d.norm()), m["rel_error"], rel_tol=1e-4)


@pytest.mark.parametrize("exact", [False, True])
def test_max_error_is_a_guarantee_and_minimal(tmp_path, exact):
    base, tuned = _pair(tmp_path, rank=8, noise=0.3)
    E = 0.2
    args = ["extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
            "--max-error", str(E), "--json"] + (["--exact-svd"] if exact else [])
    res = run_cli(*args)
    assert res.rc == 0, res.err
    mods = json.loads(res.out)["modules"]
    assert len({m["rank"] for m in mods}) >= 1
    for m in mods:
        assert m["rel_error"] <= E
        opt = _optimal_errors(base, tuned, m["tensor"])
        if exact:
            assert opt[m["rank"] - 1] > E, m  # rank − 1 would not do
        else:
            assert opt[m["rank"] - 1] > E * 0.99, m


def test_energy_policy(tmp_path):
    base, tuned = _pair(tmp_path, rank=8, noise=0.3)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad",
                  "--energy", "0.95", "--exact-svd", "--json")
    assert res.rc == 0, res.err
    for m in json.loads(res.out)["modules"]:
        assert m["kept_energy"] >= 0.95
        opt = _optimal_errors(base, tuned, m["tensor"])
        assert 1 - opt[m["rank"] - 1] ** 2 < 0.95  # one fewer keeps too little


def test_budget_beats_uniform_rank_at_the_same_size(tmp_path):
    """Modules with different spectra: the budget goes where it removes the most error."""
    base, tuned = _pair(tmp_path, noise=0.05, targets=("q_proj", "down_proj"),
                        ranks={"q_proj": 2, "down_proj": 8})
    uni = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "u",
                  "--rank", "4", "--json")
    u = json.loads(uni.out)
    params = u["totals"]["parameters"]
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "b",
                  "--budget", str(params), "--json")
    assert res.rc == 0, res.err
    b = json.loads(res.out)
    assert b["totals"]["parameters"] <= params

    def total_err_sq(rep):
        return sum((m["rel_error"] * m["delta_norm"]) ** 2 for m in rep["modules"])

    assert total_err_sq(b) <= total_err_sq(u) * (1 + 1e-6)
    assert len(set(m["rank"] for m in b["modules"])) > 1  # not simply uniform
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]  # per-module ranks reach PEFT


def test_bf16_sharded_pair_and_determinism(tmp_path):
    from loratool.verbs.demo import build_pair

    base, tuned, _ = build_pair(tmp_path / "w")
    for out in ("a", "b"):
        res = run_cli("extract", base, tuned, "-o", tmp_path / out, "--rank", "8")
        assert res.rc == 0, res.err
    assert tree(tmp_path / "a")["adapter_model.safetensors"] == tree(tmp_path / "b")[
        "adapter_model.safetensors"]  # same inputs and seed: the same bytes
    ad = read_adapter(str(tmp_path / "a"))
    assert {m.A.dtype for m in ad.modules.values()} == {torch.bfloat16}
    assert {m.rank for m in ad.modules.values()} == {8} and len(ad.modules) == 28


def test_full_tensors_embeddings_and_skip_full(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.1)
        tuned.model.embed_tokens.weight.add_(torch.randn(128, 2) @ torch.randn(2, 64) * 0.01)
        tuned.model.layers[0].self_attn.q_proj.weight.add_(
            torch.randn(64, 2) @ torch.randn(2, 64) * 0.01)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "a",
                  "--json")
    rep = json.loads(res.out)
    assert rep["full_tensors"] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert "stored in full" in run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o",
                                       tmp_path / "h").out
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "b",
                  "--embed-lora", "--skip-full", "--rank", "2", "--json")
    rep = json.loads(res.out)
    assert rep["full_tensors"] == [] and rep["dropped"] == ["model.norm.weight"]
    ad = read_adapter(str(tmp_path / "b"))
    emb = ad.modules["model.embed_tokens"]
    assert emb.layout == "embedding"
    want = tuned.model.embed_tokens.weight - base.model.embed_tokens.weight
    assert torch.allclose(emb.delta(), want, atol=1e-6)
    from peft import PeftModel

    m = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").merge_and_unload()
    for k, v in m.state_dict().items():
        assert torch.allclose(v, tuned.state_dict()[k], atol=1e-5), k


def test_gpt2_conv1d_and_biases(tmp_path):
    from peft import PeftModel

    base = tiny_gpt2()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        w = tuned.transformer.h[0].attn.c_attn
        w.weight.add_(torch.randn(32, 3) @ torch.randn(3, 96) * 0.05)  # stored [in, out]
        w.bias.add_(0.01)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "a",
                  "--rank", "3", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["modules"][0]["layout"] == "fan_in_fan_out" and rep["bias_deltas"]
    m = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, tuned(ids).logits, atol=1e-5)


def test_kohya_and_gguf_outputs(tmp_path):
    _pair(tmp_path)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o",
                  tmp_path / "k.safetensors", "--format", "kohya", "--rank", "4")
    assert res.rc == 0, res.err
    assert read_adapter(str(tmp_path / "k.safetensors")).source_format == "kohya"
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o",
                  tmp_path / "a.gguf", "--format", "gguf", "--rank", "4")
    assert res.rc == 0, res.err
    import gguf

    assert len(gguf.GGUFReader(tmp_path / "a.gguf").tensors) == 12


def test_mismatched_models_and_bad_policies(tmp_path):
    from transformers import LlamaForCausalLM

    _pair(tmp_path)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(intermediate_size=96)).save_pretrained(tmp_path / "other")
    LlamaForCausalLM(llama_config(num_hidden_layers=3)).save_pretrained(tmp_path / "deeper")
    before = tree(tmp_path)
    for args, needle in (
            ([tmp_path / "base", tmp_path / "other"], "model.layers.0.mlp.down_proj.weight is "
                                                      "[64, 128] in the base and [64, 96]"),
            ([tmp_path / "base", tmp_path / "deeper"], "model.layers.2"),
            ([tmp_path / "base", tmp_path / "base"], "nothing to extract")):
        res = run_cli("extract", *args, "-o", tmp_path / "out")
        assert res.rc == 1, (args, res)
        assert needle in res.err and len(res.err.strip().splitlines()) == 1, res.err
        assert tree(tmp_path) == before
    for args, needle in (  # usage errors: exit 2, before anything is read
            (["--rank", "4", "--energy", "0.9"], "choose one rank policy"),
            (["--energy", "1.5"], "--energy"),
            (["--budget", "lots"], "budget")):
        res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", *args, "-o",
                      tmp_path / "out")
        assert res.rc == 2 and needle in res.err, (args, res)
        assert tree(tmp_path) == before


def test_max_error_unreachable_in_bf16_is_a_clear_error(tmp_path):
    _pair(tmp_path, rank=8, noise=0.3)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--max-error", "0.0001", "--dtype", "bf16")
    assert res.rc == 1 and "cannot be met" in res.err and not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extract_matches_cpu(tmp_path):
    _pair(tmp_path, rank=8, noise=0.3)
    reps = {}
    for dev in ("cpu", "cuda"):
        res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / dev,
                      "--rank", "6", "--device", dev, "--json")
        assert res.rc == 0, res.err
        reps[dev] = {m["name"]: m["rel_error"] for m in json.loads(res.out)["modules"]}
    for name, err in reps["cpu"].items():
        assert math.isclose(reps["cuda"][name], err, rel_tol=1e-3), name


def test_position_embeddings_are_stored_in_full(tmp_path):
    """GPT-2's wpe is a lookup table: a linear LoRA on it would be silently ignored by PEFT."""
    from peft import PeftModel

    base = tiny_gpt2(n_layer=1)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.wpe.weight.add_(torch.randn(32, 2) @ torch.randn(2, 32) * 0.1)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "a",
                  "--rank", "2", "--json")
    assert res.rc == 1 and "nothing to extract" in res.err  # no LoRA-able change at all
    with torch.no_grad():
        tuned.transformer.h[0].mlp.c_fc.weight.add_(torch.randn(32, 2) @ torch.randn(2, 128))
    tuned.save_pretrained(tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "a",
                  "--rank", "2", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["full_tensors"] == ["transformer.wpe.weight"]
    m = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, tuned(ids).logits, atol=1e-5)


def test_nan_in_a_model_and_report_path_checks(tmp_path):
    from safetensors.torch import load_file, save_file

    _pair(tmp_path)
    before = tree(tmp_path)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--report", tmp_path / "base" / "r.json")
    assert res.rc == 1 and "overlaps input" in res.err and tree(tmp_path) == before
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--report", tmp_path / "nowhere" / "r.json")
    assert res.rc == 1 and "does not exist" in res.err and tree(tmp_path) == before
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--report", tmp_path / "r.json")
    assert res.rc == 0 and json.loads((tmp_path / "r.json").read_text())["totals"]
    for f in (tmp_path / "tuned").glob("model*.safetensors"):
        state = load_file(f)
        key = next((k for k in state if "q_proj" in k), None)
        if key:
            state[key][0, 0] = float("nan")
            save_file(state, f, metadata={"format": "pt"})
            break
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o2")
    assert res.rc == 1 and "NaN" in res.err and key in res.err
    assert not (tmp_path / "o2").exists()


def test_budget_counts_biases_and_full_tensors_and_dtype_bytes(tmp_path):
    base, tuned = _pair(tmp_path, norm_change=True)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "b",
                  "--budget", "3000", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["full_tensors"] == ["model.norm.weight"]
    assert read_adapter(str(tmp_path / "b")).num_params() <= 3000
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "c",
                  "--budget", "8KB", "--dtype", "fp32", "--json")
    assert res.rc == 0, res.err
    size = (tmp_path / "c" / "adapter_model.safetensors").stat().st_size
    assert size <= 8000 + 4096  # parameters counted at 4 bytes (plus the header)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "d",
                  "--budget", "10")
    assert res.rc == 1 and "less than" in res.err


def test_randomized_energy_rank_is_close_to_exact(tmp_path):
    """On 256-wide matrices the sketch (not a full SVD) picks the ranks."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=4, num_hidden_layers=1)
    base = LlamaForCausalLM(cfg).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "q_proj" in name or "down_proj" in name:
                d = torch.randn(p.shape[0], 24) @ torch.randn(24, p.shape[1])
                d *= torch.linspace(1, 0.05, p.shape[1])  # a decaying spectrum
                p.add_(d * 0.05 * p.norm() / d.norm())
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    ranks = {}
    for how in ("randomized", "exact"):
        res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / how,
                      "--energy", "0.99", "--dtype", "fp32", "--json",
                      *(["--exact-svd"] if how == "exact" else []))
        assert res.rc == 0, res.err
        mods = json.loads(res.out)["modules"]
        assert {m["svd"] for m in mods} == {how}
        ranks[how] = {m["name"]: m["rank"] for m in mods}
    for name, k in ranks["exact"].items():
        assert k <= ranks["randomized"][name] <= k + 1, (name, ranks)
