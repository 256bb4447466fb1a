"""LyCORIS adapters (LoHa, LoKr, Tucker LoCon, full) made by the real LyCORIS package on a
tiny UNet: read, inspected, merged, unmerged and converted to LoRA, each checked against
LyCORIS' own modules (its merge, its forward and its ΔW), never against loratool's output."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import cli, lycoris_network
from lycoris.kohya import create_network
from lycoris.utils import merge as lycoris_merge
from safetensors.torch import load_file


def run_cli(args: list[object], expect: int = 0):  # type: ignore[no-untyped-def]
    return cli(*args, expect=expect)

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1"]
text_encoder_target_module = []
text_encoder_target_name = []
"""
# (algo, options): every tensor layout LyCORIS writes for these algorithms
CASES = {
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {}),
    "lokr-factored": ("lokr", {"decompose_both": True, "dim": 1}),
    "lokr-tucker": ("lokr", {"use_tucker": True, "dim": 2, "conv_dim": 1}),
    "locon-tucker": ("locon", {"use_tucker": True}),
    "full": ("full", {}),
    "loha-dora": ("loha", {"dora_wd": True}),
    "locon-dora": ("locon", {"dora_wd": True}),
}


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4).eval()


def make(tmp: Path, case: str, alpha: float | None, conv_alpha: float | None, seed: int = 1
         ) -> tuple[torch.nn.Module, object, Path]:
    """A LyCORIS network on a tiny UNet with random (trained-looking) factors, saved as
    sd-scripts saves it; returns the UNet with the network applied, the network, the file.
    ``alpha`` None: alpha = dim (scale 1)."""
    algo, extra = CASES[case]
    extra = dict(extra)
    dim, conv_dim = extra.pop("dim", 4), extra.pop("conv_dim", 2)
    alpha = dim if alpha is None else alpha
    conv_alpha = conv_dim if conv_alpha is None else conv_alpha
    preset = tmp / "preset.toml"
    preset.write_text(PRESET)
    u = tiny_unet()
    net = create_network(1.0, dim, alpha, None, [], u, algo=algo, conv_dim=conv_dim,
                         conv_alpha=conv_alpha, preset=str(preset), **extra)
    net.apply_to([], u, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp / f"{case}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return u, net, path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lyco") / "unet"
    tiny_unet().save_pretrained(d)
    return d


def unet_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3]),
            torch.randn(1, 5, 12, generator=g))


def run_unet(u: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return u(*unet_inputs()).sample


def merged_unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).eval()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# LyCORIS 4.1.3 cannot load its own Tucker LoKr files back (it takes the rank from the wrong
# axis of lokr_w2_a), so that case is checked against its forward below instead
@pytest.mark.parametrize("case", [c for c in CASES if c != "lokr-tucker"])
def test_merge_equals_lycoris_merge(tmp_path: Path, base: Path, case: str) -> None:
    """alpha = dim (scale 1): loratool's float32 merge equals LyCORIS' own merge
    (lycoris.utils.merge, what its tools/merge.py runs) to float32 rounding."""
    _, net, path = make(tmp_path, case, alpha=None, conv_alpha=None)
    theirs = tiny_unet()
    lycoris_merge([], theirs, load_file(str(path)), 1.0)
    out = tmp_path / "merged"
    run_cli(["merge", str(base), str(path), "-o", str(out), "--verify"])
    ours, ref, before = weights(out), theirs.state_dict(), weights(base)
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) >= len(net.unet_loras)  # every module changed its weight
    worst, unequal, total = 0.0, 0, 0
    for k, t in ours.items():
        scale = ref[k].abs().max().item() + 1e-30
        worst = max(worst, (t - ref[k]).abs().max().item() / scale)
        unequal += int((t != ref[k]).sum())
        total += t.numel()
    # LyCORIS' DoRA divides by ‖W + ΔW‖ + ε (float32 ε = 1.2e-7), PEFT's formula (loratool's)
    # by ‖W + ΔW‖: a relative change of ε / ‖row‖, a few ulps on these small rows
    assert worst < (4 * 2.0 ** -24 if not case.endswith("dora") else 2e-6), (case, worst)
    if case != "locon-tucker" and not case.endswith("dora"):  # (other roundings there)
        assert unequal / total < 0.01, (case, unequal, total)  # nearly all bits equal too


@pytest.mark.parametrize("case", ["loha", "loha-tucker", "lokr", "lokr-factored",
                                  "lokr-tucker"])
def test_merge_follows_lycoris_forward(tmp_path: Path, base: Path, case: str) -> None:
    """alpha ≠ dim: the merged UNet gives the outputs of the UNet with the LyCORIS network
    applied (its training-time forward, scale alpha/dim once)."""
    applied, _, path = make(tmp_path, case, alpha=2, conv_alpha=1)
    out = tmp_path / "merged"
    run_cli(["merge", str(base), str(path), "-o", str(out)])
    want, got, plain = run_unet(applied), run_unet(merged_unet(out)), run_unet(tiny_unet())
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    assert torch.allclose(got, want, rtol=0, atol=2e-5), (got - want).abs().max()


def lycoris_deltas(net: object) -> dict[str, torch.Tensor]:
    """Each module's ΔW from LyCORIS' own module, in float64 (forward: scale once)."""
    out = {}
    for lm in net.unet_loras:  # type: ignore[attr-defined]
        lm = lm.to(torch.float64)
        with torch.no_grad():
            w = lm.get_weight(lm.shape) if hasattr(lm, "get_weight") else \
                lm.make_weight() * lm.scale
        out[lm.lora_name] = w.reshape(lm.shape[0], -1)
    return out


@pytest.mark.parametrize("case", ["loha", "lokr-factored", "lokr-tucker", "loha-tucker"])
@pytest.mark.parametrize("to", ["kohya", "peft"])
def test_convert_at_max_error(tmp_path: Path, base: Path, case: str, to: str) -> None:
    """convert --max-error E: every module's error against LyCORIS' own ΔW is ≤ E, measured
    here in float64 from the file written, and the report states it."""
    E = 0.05
    _, net, path = make(tmp_path, case, alpha=2, conv_alpha=1)
    out = tmp_path / ("lora.safetensors" if to == "kohya" else "peft")
    r = run_cli(["convert", str(path), "--to", to, "--max-error", str(E), "--base", str(base),
                 "-o", str(out), "--json"])
    report = json.loads(r.out)["lycoris"]
    assert report["max_rel_error"] <= E
    ref = lycoris_deltas(net)
    from loratool.formats import read_any

    ad = read_any(str(out), str(base))
    by_stem = {("lora_unet_" + m.name.replace(".", "_")): m for m in ad.modules.values()}
    stated = {("lora_unet_" + e["name"].split(".", 1)[1].replace(".", "_")): e
              for e in report["modules"]}
    assert set(stated) == set(ref)
    for stem, d in ref.items():
        m = by_stem.get(stem)
        got = m.delta(torch.float64).reshape(d.shape[0], -1) if m is not None else 0 * d
        err = float((got - d).norm() / d.norm())
        assert err <= E, (stem, err)
        assert math.isclose(err, stated[stem]["rel_error"], rel_tol=1e-3, abs_tol=1e-6)
    assert any(e["rank"] > 1 for e in report["modules"])


def test_budget_and_exact_ranks(tmp_path: Path, base: Path) -> None:
    """--budget is never exceeded (parameters); a LoHa conv of dim 2 has rank ≤ 4, so
    --max-error 1e-3 never needs more."""
    _, net, path = make(tmp_path, "loha", alpha=2, conv_alpha=1)
    out = tmp_path / "b.safetensors"
    run_cli(["convert", str(path), "--to", "kohya", "--budget", "20000", "--base", str(base),
             "-o", str(out)])
    params = sum(t.numel() for k, t in load_file(str(out)).items() if not k.endswith("alpha"))
    assert 15000 < params <= 20000
    r = run_cli(["convert", str(path), "--to", "kohya", "--max-error", "1e-3",
                 "--base", str(base), "-o", str(tmp_path / "x.safetensors"), "--json"])
    mods = json.loads(r.out)["lycoris"]["modules"]
    conv = [m for m in mods if m["name"].endswith(("conv1", "conv2", "conv_in"))]
    assert conv and all(m["rank"] <= 4 and m["rel_error"] <= 1e-3 for m in conv)


def test_unmerge_gives_the_base_back(tmp_path: Path, base: Path) -> None:
    _, _, path = make(tmp_path, "lokr-factored", alpha=2, conv_alpha=1)
    run_cli(["merge", str(base), str(path), "-o", str(tmp_path / "m")])
    run_cli(["unmerge", str(tmp_path / "m"), str(path), "-o", str(tmp_path / "u"),
             "--verify"])
    back, orig = weights(tmp_path / "u"), weights(base)
    for k, t in orig.items():
        assert torch.allclose(back[k], t, rtol=0, atol=1e-6), k


def test_inspect_shows_type_rank_and_scale(tmp_path: Path) -> None:
    _, net, path = make(tmp_path, "loha", alpha=2, conv_alpha=1)
    data = json.loads(run_cli(["inspect", str(path), "--json"]).out)
    mods = {m["name"]: m for m in data["modules"]}
    assert data["adapter"]["peft_type"] == "LYCORIS"
    assert len(mods) == len(net.unet_loras)
    for lm in net.unet_loras:
        m = mods["unet." + lm.lora_name[len("lora_unet_"):]]
        assert m["type"] == "loha" and m["rank"] == lm.lora_dim
        assert math.isclose(m["scale"], lm.scale)  # alpha / dim: 0.5 for both kinds here
    text = run_cli(["inspect", str(path)]).out
    assert "LoHa ×" in text and "type" in text


def test_steps_that_need_lora_refuse_clearly(tmp_path: Path, base: Path) -> None:
    _, _, path = make(tmp_path, "loha", alpha=2, conv_alpha=1)
    out = tmp_path / "o"
    for args in (["resize", str(path), "--rank", "2", "--base", str(base), "-o", str(out)],
                 ["analyze", str(path), "--base", str(base)],
                 ["convert", str(path), "--to", "peft", "--base", str(base), "-o", str(out)]):
        r = run_cli(args, expect=1)
        assert "LyCORIS modules (LoHa ×" in r.err and "Traceback" not in r.err
        assert len(r.err.strip().splitlines()) == 1 and not out.exists()


def test_unsupported_lycoris_types_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"lora_unet_conv_in.oft_blocks": torch.zeros(2, 4, 4),
               "lora_unet_conv_in.alpha": torch.tensor(1.0)}, str(tmp_path / "oft.safetensors"))
    r = run_cli(["inspect", str(tmp_path / "oft.safetensors")], expect=1)
    assert "LyCORIS OFT module" in r.err


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_own_names_on_a_language_model(tmp_path: Path, algo: str) -> None:
    """LyCORIS wrapping a model itself (create_lycoris, as LLM trainers use it) names its
    modules lycoris_<path with underscores>: resolved against the base's module names, read,
    inspected and merged; the merge equals LyCORIS' own (merge_to) to float32 rounding.
    alpha = dim (scale 1), as above: LyCORIS' merge of LoHa applies alpha/dim twice."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path / "base")
    net = lycoris_network(model, ["LlamaAttention", "LlamaMLP"], alpha=4, algo=algo)
    # as LyCORIS initialises it (one side zero): it changes nothing, and says so
    net.save_weights(str(tmp_path / "initial.safetensors"), torch.float32, {})
    initial = json.loads(run_cli(["merge", str(tmp_path / "base"),
                                  str(tmp_path / "initial.safetensors"), "-o",
                                  str(tmp_path / "same"), "--json"]).out)
    assert initial["tensors_changed"] == 0 and len(initial["inert_modules"]) == 14, initial
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    assert all(k.startswith("lycoris_model_layers_") for k in load_file(str(path)))
    shown = json.loads(run_cli(["inspect", str(path), "--json"]).out)
    assert len(shown["modules"]) == 14
    out = tmp_path / "merged"
    report = json.loads(run_cli(["merge", str(tmp_path / "base"), str(path), "-o", str(out),
                                 "--json"]).out)
    assert report["tensors_changed"] == 14, report
    net.merge_to(1.0)
    theirs = model.state_dict()
    ours = load_file(str(out / "model.safetensors"))
    for k, t in ours.items():
        assert torch.allclose(t, theirs[k], rtol=0, atol=4e-7), k
