"""Every figure, message and line exactly true: each printed number checked against an
independent measurement of what was written, each message against what the command does."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import cli, finetuned, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _bert(d: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny BERT (biases, norms, token types, a pooler) saved by transformers."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                             type_vocab_size=2)).eval()
    m.save_pretrained(d)
    return m


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    m = _bert(d / "base")
    finetuned(m, noise=0.01).save_pretrained(d / "tuned")
    return d


def _peft_bert(d: Path, out: Path, zero: tuple[str, ...] = (), seed: int = 1,
               targets: tuple[str, ...] = ("query", "value", "dense")) -> Path:
    """A PEFT adapter on the tiny BERT; modules named in ``zero`` keep lora_B = 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(seed)
    model = get_peft_model(BertModel.from_pretrained(d / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and any(z in name for z in zero):
                p.zero_()
    model.save_pretrained(out)
    return out


def _factors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(next(path.glob("*.safetensors")) if path.is_dir() else path)


# --------------------------------------------------------------------------- 1. --force


def test_analyze_force_replaces_its_own_outputs(bert, tmp_path):
    args = ["analyze", bert / "base", bert / "tuned", "--html", tmp_path / "a.html",
            "--plot", tmp_path / "plots"]
    cli(*args)
    cli(*args, "--force")
    assert (tmp_path / "a.html").is_file() and list((tmp_path / "plots").glob("*.png"))
    (tmp_path / "plots" / "notes.txt").write_text("mine")
    res = run_cli(*args, "--force")
    assert res.rc == 1 and "not a folder of PNG figures" in res.err and "--plot" in res.err
    assert (tmp_path / "plots" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- 2. budgets


def _fixed_bytes(adapter: Path) -> int:
    """What an adapter holds whatever the ranks, measured in the written file: full tensors
    and lora biases, at their stored dtype."""
    total = 0
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        for k in f.keys():
            if ".lora_A." in k or ".lora_B.weight" in k or "lora_embedding" in k:
                continue
            t = f.get_slice(k)
            size = {"F32": 4, "F16": 2, "BF16": 2}[t.get_dtype()]
            total += math.prod(t.get_shape()) * size
    return total


def test_a_budget_refusal_states_the_whole_fixed_cost(bert, tmp_path):
    """The total in the refusal is what an adapter written at a large budget holds in full
    (measured in its file), whatever budget was given."""
    out = tmp_path / "big"
    cli("extract", bert / "base", bert / "tuned", "-o", out, "--budget", "10MB")
    fixed = _fixed_bytes(out)
    totals = set()
    for budget in ("1KB", f"{fixed // 2}B", f"{fixed - 1}B"):
        res = run_cli("extract", bert / "base", bert / "tuned", "-o", tmp_path / budget,
                      "--budget", budget)
        assert res.rc == 1 and not (tmp_path / budget).exists(), res.err
        totals.add(int(re.search(r"less than the ([\d,]+) bytes", res.err)[1]
                       .replace(",", "")))
    assert totals == {fixed}


# --------------------------------------------------------------------------- 3, 4. combine


def test_a_module_that_changes_nothing_gets_rank_0(bert, tmp_path):
    ad = _peft_bert(bert, tmp_path / "ad", zero=("pooler",))
    for args in (["resize", ad, "--rank", "2"], ["combine", ad, ad, "--method", "svd",
                                                 "--rank", "2"],
                 ["combine", ad, ad, "--method", "cat"]):
        out = tmp_path / args[0] / str(len(args))
        report = json.loads(cli(*args, "-o", out, "--json").out)
        pooler = next(m for m in report["modules"] if "pooler" in m["name"])
        assert pooler["rank"] == 0, pooler
        assert not [k for k in _factors(out) if "pooler" in k]


def test_cat_error_is_measured_on_the_written_factors(bert, tmp_path):
    """The reported error equals ‖Σ wᵢsᵢBᵢAᵢ − B̃Ã‖/‖Σ‖ computed in float64 from the input
    files and the written file."""
    a = _peft_bert(bert, tmp_path / "a", seed=1)
    b = _peft_bert(bert, tmp_path / "b", seed=2)
    out = tmp_path / "c"
    report = json.loads(cli("combine", a, b, "--method", "cat", "--weight", "0.7",
                            "--weight", "1", "-o", out, "--json").out)
    cfg = json.loads((a / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    fa, fb, fc = _factors(a), _factors(b), _factors(out)
    worst = 0.0
    for entry in report["modules"]:
        key = f"base_model.model.{entry['name']}"
        want = sum(w * s * f[f"{key}.lora_B.weight"].double() @ f[f"{key}.lora_A.weight"]
                   .double() for f, w in ((fa, 0.7), (fb, 1.0)))
        got = fc[f"{key}.lora_B.weight"].double() @ fc[f"{key}.lora_A.weight"].double()
        err = float((want - got).norm() / want.norm())
        assert math.isclose(entry["rel_error"], err, rel_tol=1e-6, abs_tol=1e-15), entry
        worst = max(worst, err)
    assert worst > 1e-9  # 0.7·s·A was rounded to float32: an error there is, and shown
    assert math.isclose(report["totals"]["max_rel_error"], worst, rel_tol=1e-6)


# --------------------------------------------------------------------------- 5, 6. export, merge


def test_merge_and_export_count_only_changed_tensors(bert, tmp_path):
    ad = _peft_bert(bert, tmp_path / "ad", zero=("pooler",))
    report = json.loads(cli("merge", bert / "base", ad, "-o", tmp_path / "m", "--json").out)
    base = load_file(bert / "base" / "model.safetensors")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    differ = sum(not torch.equal(base[k], merged[k]) for k in base)
    assert report["tensors_changed"] == differ and report["inert_modules"] == ["pooler.dense"]
    assert math.isclose(report["gb_per_s"] * report["stream_seconds"], report["bytes"] / 1e9)
    exp = json.loads(cli("export", bert / "base", ad, "-o", tmp_path / "onnx", "--json").out)
    assert exp["tensors_changed_by_adapters"] == differ
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    assert exp["opset"] == next(o.version for o in graph.opset_import if o.domain in ("",
                                                                                   "ai.onnx"))
    assert "18" not in cli("export", "-h").out.split("--opset")[1].split("--task")[0]


def test_compare_leaves_out_modules_that_change_nothing(bert, tmp_path):
    a = _peft_bert(bert, tmp_path / "a", zero=("pooler",), seed=1)
    b = _peft_bert(bert, tmp_path / "b", zero=("pooler",), seed=2)
    report = json.loads(cli("analyze", "--compare", a, b, "--json").out)
    assert report["changes_nothing"] == ["pooler.dense"]
    assert "pooler.dense" not in [m["name"] for m in report["modules"]]


# --------------------------------------------------------------------------- 8. plots


def test_plots_of_small_spectra_and_sampled_layers(monkeypatch):
    from loratool.verbs import plots

    figs = {}
    monkeypatch.setattr(plots, "_png", lambda fig: figs.setdefault(len(figs), fig) and b"")
    two = {"name": "embeddings.token_type_embeddings", "singular_values": [3.0, 0.0],
           "error_curve": [1.0, 0.0, 0.0], "effective_rank": {"0.9": 1}}
    report = {"mode": "finetune", "energies": [0.5, 0.9, 0.99], "modules": [two]}
    names = plots.figures(report)
    assert list(names) == ["spectra-embeddings.token_type_embeddings.png",
                           "errors-embeddings.token_type_embeddings.png"]
    ax = figs[0].axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "1 singular values of 0 not shown" in ax.get_title()
    layers = [{"name": f"encoder.layer.{i}.attention.self.query", "phi": [[1.0]]}
              for i in range(6)]
    figs.clear()
    names = plots.figures({"mode": "compare", "modules": layers})
    assert list(names) == ["similarity-encoder.layer.N.attention.self.query.png"]
    assert "0, 2, 4, 5 of 6 shown" in figs[0]._suptitle.get_text()


# --------------------------------------------------------------------------- 9, 10. inspect


def test_inspect_folds_per_layer_ranks_into_one_row(bert, tmp_path):
    out = tmp_path / "x"
    cli("extract", bert / "base", bert / "tuned", "-o", out, "--max-error", "0.3")
    ranks = {}
    for m in json.loads(cli("inspect", out, "--json").out)["modules"]:
        ranks.setdefault(re.sub(r"\.\d+\.", ".*.", m["name"]), set()).add(m["rank"])
    assert any(len(r) > 1 for r in ranks.values())  # the layers got different ranks
    text = cli("inspect", out).out
    table = text.split("in→out")[1].split("\n\n")[0].strip().splitlines()
    names = [row.split()[0] for row in table]
    assert len(names) == len(set(names)) == len(ranks)  # one row per kind of module
    for row in table:
        name, rank = row.split()[0], row.split()[2 if "×" in row else 1]
        lo, hi = min(ranks[name]), max(ranks[name])
        assert rank == (str(lo) if lo == hi else f"{lo}–{hi}"), row


def test_inspect_of_a_lycoris_file_states_its_own_rank_and_alpha(tmp_path):
    from test_lycoris import make

    path = make(tmp_path, "loha", alpha=4, conv_alpha=4)[2]  # dim 4, conv dim 2
    data = json.loads(cli("inspect", path, "--json").out)
    ranks = {m["rank"] for m in data["modules"]}
    assert data["adapter"]["r"] in ranks and data["adapter"]["r"] != 8
    assert data["adapter"]["lora_alpha"] == 4.0
    flat = [m for m in data["modules"] if m["layout"] == "2-D"]
    assert flat and not [m for m in data["modules"] if m["layout"] == "linear"]
    assert "the base tells which" in cli("inspect", path).out


# --------------------------------------------------------------------------- 11, 12. messages


def test_one_style_of_usage_error(bert, tmp_path):
    for args in (["extract", bert / "base", bert / "tuned", "-o", tmp_path / "o", "--rank",
                  "0"], ["merge", bert / "base", "--nope"],
                 ["combine", bert / "base", "--method", "cat", "--rank", "3", "-o",
                  tmp_path / "o"]):
        res = run_cli(*args)
        assert res.rc == 2 and res.err.startswith("loratool: usage error: "), res.err
        assert len(res.err.strip().splitlines()) == 1, res.err


def test_an_unknown_kohya_name_blames_the_base_by_name(bert, tmp_path):
    save_file({"lora_te_nothing_here.lora_down.weight": torch.zeros(2, 32),
               "lora_te_nothing_here.lora_up.weight": torch.zeros(32, 2)},
              tmp_path / "k.safetensors")
    res = run_cli("merge", bert / "base", tmp_path / "k.safetensors", "-o", tmp_path / "m")
    assert res.rc == 1 and "--base" not in res.err and str(bert / "base") in res.err, res.err


def test_a_filter_that_matches_nothing_says_how_names_look(bert):
    out = cli("inspect", bert / "base", "--filter", "*layers.0.*").out
    assert "0 tensors match" in out and "names here look like encoder.layer." in out
