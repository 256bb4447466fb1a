"""PEFT's other tuners (AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT), made by PEFT itself on a
tiny Llama and a tiny BERT (which has biases), their weights randomised (PEFT initialises many
to the identity): merge equals PEFT's ``merge_and_unload()`` bit for bit in float32, unmerge
gives the base back, inspect tells each, convert to LoRA reports the error an independent
SVD measures, and the steps that need LoRA factors refuse in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import cli, llama_config
from safetensors.torch import load_file

import loratool
from loratool.errors import FormatError

TUNERS = ["adalora", "ia3", "loha", "lokr", "vera", "oft", "boft"]
MODELS = ["llama", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "value", "output.dense"]}
FEEDFORWARD = {"llama": ["down_proj"], "bert": ["output.dense"]}


def tuner_config(kind: str, model: str):  # type: ignore[no-untyped-def]
    """Small configs; the non-default settings that change the math are exercised: LoKr with
    both sides whole and one factored, OFT's Neumann series, BOFT's scale."""
    import peft

    t = TARGETS[model]
    return {
        "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8,
                                              target_modules=t, total_step=10),
        "ia3": lambda: peft.IA3Config(target_modules=t, feedforward_modules=FEEDFORWARD[model]),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=t,
                                        rank_pattern={"v_proj": 2, "value": 2}),
        "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=t),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=t),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=t),
    }[kind]()


def base_model(model: str):  # type: ignore[no-untyped-def]
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    torch.manual_seed(0)
    if model == "llama":
        return LlamaForCausalLM(llama_config()).eval()
    bert = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, vocab_size=100,
                                max_position_embeddings=64)).eval()
    with torch.no_grad():  # BERT initialises its biases to zero: IA³'s scaling would not show
        for name, p in bert.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return bert


def randomise(peft_model, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Every trainable adapter value random (IA³'s l and BOFT's s around 1, OFT/BOFT's
    generators small, as training leaves them), so that a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad and "vera_" not in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name or "boft_s" in name:
                p.copy_(1 + 0.3 * noise)
            elif "oft_R" in name or "boft_R" in name:
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[tuple[str, str], dict[str, object]]:
    """Per (tuner, model): the base folder, the adapter folder, PEFT's merged state dict."""
    import peft

    out: dict[tuple[str, str], dict[str, object]] = {}
    for model in MODELS:
        base = base_model(model)
        base_dir = tmp_path_factory.mktemp(f"{model}_base")
        base.save_pretrained(base_dir)
        for i, kind in enumerate(TUNERS):
            pm = peft.get_peft_model(copy.deepcopy(base), tuner_config(kind, model))
            randomise(pm, i)
            d = tmp_path_factory.mktemp(f"{model}_{kind}")
            pm.save_pretrained(d)
            merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
            out[kind, model] = {"base": base_dir, "adapter": d, "merged": merged}
    return out


def _merged_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


CASES = [(k, m) for k in TUNERS for m in MODELS]


@pytest.mark.parametrize("kind,model", CASES)
def test_merge_equals_peft_and_unmerge_gives_the_base_back(made, tmp_path: Path, kind: str,
                                                           model: str) -> None:
    c = made[kind, model]
    out = tmp_path / "merged"
    report = loratool.merge(c["base"], [c["adapter"]], out, verify=True)
    assert report.verify is not None and report.verify.ok
    got = _merged_file(out)
    want = c["merged"]
    changed = 0
    base = _merged_file(Path(c["base"]))
    for name, t in got.items():
        assert torch.equal(t, want[name]), (kind, model, name,
                                            float((t - want[name]).abs().max()))
        changed += not torch.equal(t, base[name])
    assert changed == report.tensors_changed and changed >= 6
    back = tmp_path / "back"
    u = loratool.unmerge(out, [c["adapter"]], back, verify=True)
    assert u.verify is not None and u.verify.ok
    restored = _merged_file(back)
    for name, t in base.items():  # bit for bit: the merge's record holds what rounding lost
        assert torch.equal(restored[name], t), (kind, model, name)


@pytest.mark.parametrize("kind,model", CASES)
def test_convert_reports_the_error_an_svd_measures(made, tmp_path: Path, kind: str,
                                                   model: str) -> None:
    """ΔW measured independently (PEFT's merged weight − the base, float64): the error that
    convert reports for each module is the written LoRA's own error against it, and no better
    than the optimum of a dense SVD at that rank (Eckart–Young) nor far from it."""
    c = made[kind, model]
    out = tmp_path / "lora"
    r = loratool.convert(c["adapter"], out, "peft", base=str(c["base"]),
                         policy=loratool.RankPolicy.rank(2))
    assert r.lycoris is not None and len(r.lycoris.modules) >= 6
    base = _merged_file(Path(c["base"]))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    lora = load_file(out / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    for e in r.lycoris.modules:
        name = next(n for n in (e.name + ".weight", "model." + e.name + ".weight")
                    if n in c["merged"])
        D = c["merged"][name].double() - base[name].double()
        key = "base_model.model." + e.name + ".lora_"
        BA = lora[key + "B.weight"].double() @ lora[key + "A.weight"].double() * scale
        measured = float((D - BA).norm() / D.norm())
        S = torch.linalg.svdvals(D)
        best = float(S[2:].norm() / S.norm())
        assert e.rank == 2 and e.type == kind
        # D here carries PEFT's float32 rounding of W + ΔW: a few 1e-7 of |W|
        assert abs(e.rel_error - measured) <= 1e-4 * measured + 1e-5, (e.name, e.rel_error,
                                                                       measured)
        assert best - 1e-5 <= e.rel_error <= 1.02 * best + 1e-5, (e.name, e.rel_error, best)


def test_ia3_bias_scaling_becomes_a_lora_bias(made, tmp_path: Path) -> None:
    """IA³ on BERT's query/value outputs scales their biases too (PEFT's merge does): the
    converted LoRA carries b·(l − 1) as lora_B.bias, PEFT's merged bias − the base's."""
    c = made["ia3", "bert"]
    out = tmp_path / "lora"
    loratool.convert(c["adapter"], out, "peft", base=str(c["base"]),
                     policy=loratool.RankPolicy.rank(2))
    lora = load_file(out / "adapter_model.safetensors")
    base = _merged_file(Path(c["base"]))
    name = "encoder.layer.0.attention.self.query"
    got = lora[f"base_model.model.{name}.lora_B.bias"]
    want = c["merged"][name + ".bias"].double() - base[name + ".bias"].double()
    assert float((got.double() - want).abs().max()) <= 1e-7 * float(want.abs().max()) + 1e-8
    assert float(want.abs().max()) > 1e-3  # the biases are not zero: the test can fail


EXPECT = {  # (type, what inspect says of the first module: rank, block size, parameters)
    ("adalora", "llama"): ("adalora", 6, None, 6 * 128 + 6 + 64 * 6),
    ("ia3", "llama"): ("ia3", 0, None, 128),
    ("loha", "llama"): ("loha", 4, None, 2 * (64 * 4 + 4 * 128)),
    ("lokr", "llama"): ("lokr", 4, None, 8 * 8 + 8 * 4 + 4 * 16),
    ("vera", "llama"): ("vera", 4, None, 64 + 4),
    ("oft", "llama"): ("oft", 0, 8, 16 * 28),
    ("boft", "llama"): ("boft", 0, 4, 32 * 16 + 64),
}


@pytest.mark.parametrize("kind", TUNERS)
def test_inspect_tells_type_rank_or_block_and_parameters(made, kind: str) -> None:
    c = made[kind, "llama"]
    r = cli("inspect", c["adapter"], "--json")
    info = json.loads(r.out)
    assert info["adapter"]["peft_type"] == kind.upper()
    mods = info["modules"]
    assert len(mods) == 6
    first = mods[0]  # natural order: layers.0.mlp.down_proj
    assert first["name"] == "model.layers.0.mlp.down_proj"
    want_type, rank, block, params = EXPECT[kind, "llama"]
    assert (first["type"], first["rank"], first.get("block_size"), first["params"]) == (
        want_type, rank, block, params)
    text = cli("inspect", c["adapter"]).out
    assert "params" in text and ("block" in text) == (block is not None)
    # a scaling or a rotation has no rank: none is shown for it
    assert ("ranks:" in text) == (kind not in ("ia3", "oft", "boft")), text


@pytest.mark.parametrize("kind", TUNERS)
def test_steps_that_need_lora_factors_refuse_naming_convert(made, tmp_path: Path,
                                                            kind: str) -> None:
    c = made[kind, "llama"]
    out = tmp_path / "o"
    for args in (["resize", c["adapter"], "--rank", "2", "-o", out],
                 ["combine", c["adapter"], c["adapter"], "--method", "svd", "--rank", "2",
                  "-o", out],
                 ["analyze", c["adapter"]]):
        r = cli(*args, expect=1)
        assert "PEFT tuner modules" in r.err and "loratool convert" in r.err, (args, r.err)
        assert "--to peft" in r.err and "Traceback" not in r.err
        assert len(r.err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("kind", ["ia3", "oft", "boft", "vera"])
def test_convert_without_the_base_says_why_it_needs_it(made, tmp_path: Path,
                                                       kind: str) -> None:
    r = cli("convert", made[kind, "llama"]["adapter"], "--to", "peft", "--rank", "2", "-o",
            tmp_path / "o", expect=1)
    assert "--base BASE" in r.err and len(r.err.strip().splitlines()) == 1


def test_unknown_peft_types_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "ln"
    d.mkdir()
    save_file({"base_model.model.model.norm.ln_tuning_layers.weight": torch.ones(4)},
              d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LN_TUNING"}))
    for args in (["inspect", d], ["convert", d, "--to", "kohya", "-o", tmp_path / "o"]):
        r = cli(*args, expect=1)
        assert "LN_TUNING" in r.err and "ADALORA" in r.err and "Traceback" not in r.err


def test_a_weight_on_a_multiplicative_tuner_is_refused(made, tmp_path: Path) -> None:
    c = made["ia3", "llama"]
    with pytest.raises(FormatError, match="convert it to LoRA first"):
        loratool.merge(c["base"], [c["adapter"]], tmp_path / "o", weights=[0.5])
    with pytest.raises(FormatError, match="merge that adapter alone"):
        loratool.merge(c["base"], [c["adapter"], made["oft", "llama"]["adapter"]],
                       tmp_path / "o")


def test_an_ia3_scale_with_zeros_merges_and_says_what_cannot_be_undone(made, tmp_path: Path
                                                                       ) -> None:
    """PEFT merges an IA³ vector with zeros (those weights become 0); so does loratool, equal
    to PEFT, naming the tensors no unmerge can undo; unmerge then refuses them in one line."""
    import peft

    base = base_model("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), tuner_config("ia3", "llama"))
    randomise(pm, 7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.view(-1)[:2] = 0.0
    pm.save_pretrained(tmp_path / "ad")
    want = pm.merge_and_unload().state_dict()
    report = loratool.merge(made["ia3", "llama"]["base"], [tmp_path / "ad"], tmp_path / "m")
    for name, t in _merged_file(tmp_path / "m").items():
        assert torch.equal(t, want[name]), name
    assert report.exact is not None and len(report.exact.not_applied) == report.tensors_changed
    assert "cannot be unmerged" in report.render()
    with pytest.raises(FormatError, match="has zeros; a merge with them cannot be undone"):
        loratool.unmerge(tmp_path / "m", [tmp_path / "ad"], tmp_path / "back")


def test_export_merges_a_rotation(made, tmp_path: Path) -> None:
    """export goes through the same merge: OFT on the tiny Llama, the ONNX graph's logits
    against PEFT's own merged model's."""
    ort = pytest.importorskip("onnxruntime")
    from transformers import LlamaForCausalLM

    c = made["oft", "llama"]
    r = loratool.export(c["base"], [c["adapter"]], tmp_path / "onnx")
    assert r.verification.ok
    peft_merged = LlamaForCausalLM(llama_config()).eval()
    peft_merged.load_state_dict(c["merged"])
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = sess.run(None, {k: v for k, v in feed.items()
                          if k in {i.name for i in sess.get_inputs()}})[0]
    with torch.no_grad():
        want = peft_merged(input_ids=ids, attention_mask=mask).logits.numpy()
    base = LlamaForCausalLM.from_pretrained(c["base"]).eval()
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).logits.numpy()
    assert abs(got - want).max() <= 1e-4 < abs(before - want).max()
