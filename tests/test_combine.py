"""combine and resize against dense float64 references written here from the definitions."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import llama_config, run_cli, tree

from loratool.formats import read_adapter


def _adapter(tmp_path, name, seed, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval()
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg.update(kw)
    get_peft_model(copy.deepcopy(base), LoraConfig(**cfg)).save_pretrained(tmp_path / name)
    return base


def _dense_sum(tmp_path, names, weights):
    """Σ wᵢ·ΔWᵢ per module, float64, from each adapter's own factors."""
    out: dict[str, torch.Tensor] = {}
    for n, w in zip(names, weights):
        for m in read_adapter(str(tmp_path / n)).modules.values():
            d = w * m.delta(torch.float64)
            out[m.name] = out[m.name] + d if m.name in out else d
    return out


@pytest.fixture
def three(tmp_path):
    """Mixed ranks, rsLoRA, an alpha pattern and partly disjoint modules."""
    base = _adapter(tmp_path, "a", 1)
    _adapter(tmp_path, "b", 2, r=8, use_rslora=True, target_modules=["q_proj", "down_proj"])
    _adapter(tmp_path, "c", 3, r=2, alpha_pattern={"v_proj": 32})
    return base


def test_cat_is_the_exact_weighted_sum(tmp_path, three):
    from peft import PeftModel

    names, weights = ["a", "b", "c"], [0.5, -1.25, 2.0]
    res = run_cli("combine", *(tmp_path / n for n in names), "--method", "cat", *sum(
        (["--weight", str(w)] for w in weights), []), "-o", tmp_path / "out", "--json")
    assert res.rc == 0, res.err
    ref = _dense_sum(tmp_path, names, weights)
    got = read_adapter(str(tmp_path / "out"))
    assert set(got.modules) == set(ref)  # modules of only some adapters are kept
    for k, m in got.modules.items():
        assert m.scale == 1.0
        assert torch.allclose(m.delta(torch.float64), ref[k], rtol=0, atol=1e-5), k
    q = got.modules["model.layers.0.self_attn.q_proj"]
    assert q.rank == 4 + 8 + 2
    PeftModel.from_pretrained(copy.deepcopy(three), tmp_path / "out")  # PEFT loads it


@pytest.mark.parametrize("rank", [3, 6])
def test_svd_is_optimal_without_dense_matrices(tmp_path, three, rank):
    names, weights = ["a", "b", "c"], [1.0, 0.5, -1.0]
    res = run_cli("combine", *(tmp_path / n for n in names), "--method", "svd", "--rank",
                  str(rank), *sum((["--weight", str(w)] for w in weights), []), "-o",
                  tmp_path / "out", "--dtype", "fp32", "--json")
    assert res.rc == 0, res.err
    ref = _dense_sum(tmp_path, names, weights)
    got = read_adapter(str(tmp_path / "out"))
    reported = {m["name"]: m["rel_error"] for m in json.loads(res.out)["modules"]}
    for k, d in ref.items():
        s = torch.linalg.svdvals(d)
        optimum = float(s[rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        err = float((got.modules[k].delta(torch.float64) - d).norm() / d.norm())
        assert err <= 1.001 * optimum + 1e-7, (k, err, optimum)
        assert math.isclose(reported[k], err, rel_tol=1e-3, abs_tol=1e-6)


def test_resize(tmp_path, three):
    res = run_cli("resize", tmp_path / "b", "--rank", "3", "-o", tmp_path / "r", "--dtype",
                  "fp32", "--json")
    assert res.rc == 0, res.err
    ref = _dense_sum(tmp_path, ["b"], [1.0])
    got = read_adapter(str(tmp_path / "r"))
    for k, d in ref.items():
        s = torch.linalg.svdvals(d)
        optimum = float(s[3:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        err = float((got.modules[k].delta(torch.float64) - d).norm() / d.norm())
        assert got.modules[k].rank == 3 and err <= 1.001 * optimum, (k, err, optimum)
    res = run_cli("resize", tmp_path / "b", "--energy", "0.9", "-o", tmp_path / "e", "--json")
    for m in json.loads(res.out)["modules"]:
        assert m["kept_energy"] >= 0.9


# ------------------------------------------------------------------ TIES / DARE references


def _trim_ref(t, density):
    """Keep the top ceil(density·n) entries by magnitude (Yadav et al. 2023, 'trim')."""
    k = math.ceil(density * t.numel())
    idx = t.abs().flatten().argsort(descending=True)[:k]
    out = torch.zeros(t.numel(), dtype=t.dtype)
    out[idx] = t.flatten()[idx]
    return out.view_as(t)


def _elect_merge_ref(ts):
    """Elect γ = sign(Σ τ̂ᵢ); average the entries agreeing with γ (zeros excluded)."""
    total = sum(ts)
    out = torch.zeros_like(total)
    for i in range(total.numel()):
        g = torch.sign(total.flatten()[i])
        vals = [float(t.flatten()[i]) for t in ts
                if t.flatten()[i] != 0 and torch.sign(t.flatten()[i]) == g]
        out.view(-1)[i] = sum(vals) / len(vals) if vals else 0.0
    return out


def _vectors(tmp_path, names, weights, key):
    ads = [read_adapter(str(tmp_path / n)) for n in names]
    out = []
    for ad, w in zip(ads, weights):
        m = ad.modules[key]
        out.append((m.B.double() @ m.A.double()) * (m.scale * w))  # factor orientation
    return out


def _result(tmp_path, out, key):
    m = read_adapter(str(tmp_path / out)).modules[key]
    return (m.B.double() @ m.A.double()) * m.scale


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_elementwise_methods_match_the_papers(tmp_path, method):
    from loratool.numerics.lowrank import module_seed

    _adapter(tmp_path, "a", 1)
    _adapter(tmp_path, "b", 2, r=8)
    names, weights, density = ["a", "b"], [1.0, 0.7], 0.3
    args = ["combine", tmp_path / "a", tmp_path / "b", "--method", method, "--weight", "1.0",
            "--weight", "0.7", "--density", str(density), "--rank", "64", "--dtype", "fp32",
            "--seed", "5"]
    res = run_cli(*args, "-o", tmp_path / "out")
    assert res.rc == 0, res.err
    key = "model.layers.1.self_attn.v_proj"
    taus = _vectors(tmp_path, names, weights, key)
    if method in ("dare_linear", "dare_ties"):
        kept = []
        for i, t in enumerate(taus):
            g = torch.Generator().manual_seed(module_seed(5, f"{i}:{key}"))
            mask = torch.rand(t.shape, generator=g, dtype=torch.float32) < density
            kept.append(torch.where(mask, t / density, torch.zeros_like(t)))
        ref = sum(kept) if method == "dare_linear" else _elect_merge_ref(kept)
    elif method == "ties":
        ref = _elect_merge_ref([_trim_ref(t, density) for t in taus])
    else:
        ref = sum(_trim_ref(t, density) for t in taus)
    got = _result(tmp_path, "out", key)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    if method.startswith("dare"):  # seeded: same seed, same bytes; another seed differs
        assert run_cli(*args, "-o", tmp_path / "again").rc == 0
        assert tree(tmp_path / "out")["adapter_model.safetensors"] == tree(
            tmp_path / "again")["adapter_model.safetensors"]
        args[args.index("--seed") + 1] = "6"
        assert run_cli(*args, "-o", tmp_path / "other").rc == 0
        assert not torch.allclose(_result(tmp_path, "other", key), got)


def test_bad_combines(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    _adapter(tmp_path, "a", 1)
    torch.manual_seed(0)
    other = LlamaForCausalLM(llama_config(hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=1))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "other")
    _adapter(tmp_path, "dora", 4, use_dora=True)
    before = tree(tmp_path)
    for args, code, needle in (
            ([tmp_path / "a", tmp_path / "other", "--method", "cat"], 1, "different bases"),
            ([tmp_path / "a", tmp_path / "dora", "--method", "svd"], 1, "DoRA"),
            ([tmp_path / "a", tmp_path / "a", "--method", "bogus"], 2, "bogus"),
            ([tmp_path / "a", tmp_path / "a", "--method", "ties", "--density", "0"], 2,
             "--density")):
        res = run_cli("combine", *args, "-o", tmp_path / "out")
        assert res.rc == code, (args, res)
        assert needle in res.err, res.err
        assert tree(tmp_path) == before


def test_biases_survive_resize_and_svd(tmp_path):
    from transformers import LlamaForCausalLM

    _adapter(tmp_path, "bias", 7, lora_bias=True, target_modules=["o_proj"])
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(attention_bias=True))  # (the adapter targets biased layers)
    for cmd in (["resize", tmp_path / "bias", "--rank", "2"],
                ["combine", tmp_path / "bias", tmp_path / "bias", "--method", "svd",
                 "--rank", "2"]):
        out = tmp_path / cmd[0]
        res = run_cli(*cmd, "-o", out)
        assert res.rc == 0, res.err
        orig = read_adapter(str(tmp_path / "bias"))
        got = read_adapter(str(out))
        n = 1 if cmd[0] == "resize" else 2
        for k, m in orig.modules.items():
            want = n * m.scale * m.bias.double()
            assert torch.allclose(got.modules[k].scale * got.modules[k].bias.double(), want,
                                  atol=1e-6), k


def test_max_error_on_stored_factors_and_full_only_adapter(tmp_path, three):
    res = run_cli("resize", tmp_path / "b", "--max-error", "0.01", "-o", tmp_path / "r",
                  "--json")
    assert res.rc == 0, res.err
    ref = _dense_sum(tmp_path, ["b"], [1.0])
    got = read_adapter(str(tmp_path / "r"))
    for m in json.loads(res.out)["modules"]:
        d = ref[m["name"]]
        err = float((got.modules[m["name"]].delta(torch.float64) - d).norm() / d.norm())
        assert err <= 0.01 and math.isclose(err, m["rel_error"], rel_tol=1e-3, abs_tol=1e-7)


def test_adapter_with_only_full_tensors_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "full"
    d.mkdir()
    save_file({"base_model.model.model.norm.weight": torch.ones(64)},
              d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "modules_to_save": ["model.norm"]}))
    res = run_cli("resize", d, "--rank", "2", "-o", tmp_path / "o")
    assert res.rc == 1 and "internal error" not in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_budget_too_small_for_any_rank(tmp_path, three):
    res = run_cli("resize", tmp_path / "a", "--budget", "1", "-o", tmp_path / "r")
    assert res.rc == 1 and "raise --budget" in res.err and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- cat, byte for byte

def _cat_generally(monkeypatch, *args, **kw):
    """The general (torch) path of cat, the byte path turned off."""
    import loratool.verbs.combine as verb

    monkeypatch.setattr(verb, "cat_bytes", lambda *a, **k: None)
    return verb.combine(*args, **kw)


@pytest.mark.parametrize("case", ["one scale", "patterns", "fan_in_fan_out"])
def test_cat_of_peft_folders_is_their_bytes_and_what_the_general_path_writes(
        tmp_path, monkeypatch, case):
    """Adapters whose modules share one w·s: the command writes the factors as they are,
    without loading torch, and the same files (config, card, tensors) and report as the
    general path."""
    import subprocess
    import sys

    from conftest import tiny_gpt2

    import loratool

    if case == "fan_in_fan_out":
        base = tiny_gpt2()
        for name, seed in (("a", 1), ("b", 2)):
            torch.manual_seed(seed)
            from peft import LoraConfig, get_peft_model
            get_peft_model(copy.deepcopy(base), LoraConfig(
                r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                init_lora_weights=False)).save_pretrained(tmp_path / name)
    elif case == "patterns":  # r 4 alpha 8 and r 2 alpha 4: one scale, two ranks
        _adapter(tmp_path, "a", 1, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4})
        _adapter(tmp_path, "b", 2, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    else:
        _adapter(tmp_path, "a", 1)
        _adapter(tmp_path, "b", 2)
    probe = ("import atexit, sys\natexit.register(lambda: print('torch', 'torch' in "
             "sys.modules, file=sys.stderr))\nfrom loratool.cli import main\nmain(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", probe, "combine", tmp_path / "a", tmp_path / "b",
                        "--method", "cat", "-o", tmp_path / "bytes", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "torch False" in r.stderr, r.stderr
    fast = json.loads(r.stdout)
    general = _cat_generally(monkeypatch, [tmp_path / "a", tmp_path / "b"],
                             tmp_path / "general", "cat")
    assert tree(tmp_path / "bytes") == tree(tmp_path / "general")
    slow = json.loads(general.to_json())
    fast["seconds"] = slow["seconds"] = 0
    fast["output"] = slow["output"] = ""
    assert fast == slow
    assert fast["totals"]["max_rel_error"] == 0
    # and it is the exact sum: against each input's own ΔW in float64
    ref = _dense_sum(tmp_path, ["a", "b"], [1.0, 1.0])
    got = loratool.formats.read_adapter(str(tmp_path / "bytes"))
    for k, m in got.modules.items():
        assert torch.equal(m.delta(torch.float64), ref[k]) or torch.allclose(
            m.delta(torch.float64), ref[k], rtol=1e-12, atol=0), k


def test_cat_equals_peft_own_cat(tmp_path):
    """PEFT's add_weighted_adapter(combination_type="cat") of the same two adapters gives the
    same ΔW as the adapter cat writes (byte path), merged by PEFT itself."""
    from peft import PeftModel

    base = _adapter(tmp_path, "a", 1)
    _adapter(tmp_path, "b", 2)
    res = run_cli("combine", tmp_path / "a", tmp_path / "b", "--method", "cat", "-o",
                  tmp_path / "ours")
    assert res.rc == 0, res.err
    m = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    m.load_adapter(tmp_path / "b", adapter_name="b")
    m.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    m.set_adapter("ab")
    theirs = m.merge_and_unload(adapter_names=["ab"]).state_dict()
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ours = ours.merge_and_unload().state_dict()
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=1e-6), k


def test_cat_takes_the_general_path_where_bytes_are_not_enough(tmp_path):
    """Weights that give modules different w·s: A is scaled (scale 1), torch does it."""
    import subprocess
    import sys

    _adapter(tmp_path, "a", 1)
    _adapter(tmp_path, "b", 2)
    probe = ("import atexit, sys\natexit.register(lambda: print('torch', 'torch' in "
             "sys.modules, file=sys.stderr))\nfrom loratool.cli import main\nmain(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", probe, "combine", tmp_path / "a", tmp_path / "b",
                        "--method", "cat", "--weight", "0.7", "--weight", "1", "-o",
                        tmp_path / "w"], capture_output=True, text=True)
    assert r.returncode == 0 and "torch True" in r.stderr, r.stderr
    got = read_adapter(str(tmp_path / "w"))
    assert {m.scale for m in got.modules.values()} == {1.0}


def test_cat_bytes_keep_a_zero_part_and_leave_a_zero_module_to_the_general_path(
        tmp_path, monkeypatch):
    """A freshly initialised adapter (lora_B = 0) beside a trained one: its parts are copied
    as they are, as the general path writes them; alone, every module is zero and the
    general path refuses to write nothing."""
    _adapter(tmp_path, "a", 1)
    _adapter(tmp_path, "z", 2, init_lora_weights=True)
    res = run_cli("combine", tmp_path / "a", tmp_path / "z", "--method", "cat", "-o",
                  tmp_path / "bytes")
    assert res.rc == 0, res.err
    _cat_generally(monkeypatch, [tmp_path / "a", tmp_path / "z"], tmp_path / "general",
                   "cat")
    assert tree(tmp_path / "bytes") == tree(tmp_path / "general")
    monkeypatch.undo()
    res = run_cli("combine", tmp_path / "z", tmp_path / "z", "--method", "cat", "-o",
                  tmp_path / "zero")
    assert res.rc == 1 and "every module's change is zero" in res.err, res.err
    assert not (tmp_path / "zero").exists()
