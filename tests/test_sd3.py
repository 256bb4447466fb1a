"""SD3: kohya sd-scripts and single-file checkpoints name the MMDiT by Stability's original
modules (``joint_blocks.0.x_block.attn.qkv`` holds diffusers' to_q, to_k, to_v). A tiny
SD3.5-style transformer (dual attention, qk norms) built in code: the original layout is checked
with diffusers' own single-file loader, and kohya files with original names convert, read back
and merge into both layouts with the same result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli as run_cli
from safetensors.torch import load_file, save_file


def tiny_sd3():  # type: ignore[no-untyped-def]
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm").eval()


_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q",
          "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def original_file(folder: Path, path: Path) -> None:
    """The transformer in Stability's layout, fused and swapped by loratool's map (checked by
    diffusers' single-file loader in the test)."""
    from loratool.formats.flux_names import original_map, swap_rows

    config = __import__("json").loads((folder / "config.json").read_text())
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for orig, (parts, swapped) in original_map(config).items():
        for leaf in ("weight", "bias"):
            if all(f"{p}.{leaf}" in sd for p in parts):
                t = torch.cat([sd[f"{p}.{leaf}"] for p in parts])
                out[f"{orig}.{leaf}"] = swap_rows(t) if swapped else t
    for i in range(config["num_layers"]):
        for ours, theirs in _NORMS.items():
            if f"transformer_blocks.{i}.{ours}.weight" in sd:
                out[f"joint_blocks.{i}.{theirs}.weight"] = sd[f"transformer_blocks.{i}.{ours}"
                                                               ".weight"]
    save_file(out, path)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    d = tmp_path_factory.mktemp("sd3")
    tiny_sd3().save_pretrained(d / "transformer")
    original_file(d / "transformer", d / "sd3.safetensors")
    model = tiny_sd3()
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "add_k_proj", "to_out.0", "to_add_out", "ff.net.0.proj",
        "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder"])
    torch.manual_seed(3)
    inject_adapter_in_model(cfg, model)
    StableDiffusion3Pipeline.save_lora_weights(
        d / "lora", transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=cfg.to_dict())
    return d


def test_original_layout_is_diffusers_own(sd3: Path) -> None:
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel.from_single_file(sd3 / "sd3.safetensors",
                                               config=str(sd3 / "transformer"),
                                               subfolder=None)
    want = load_file(sd3 / "transformer" / "diffusion_pytorch_model.safetensors")
    got = m.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_kohya_sd3_names_both_ways_and_both_layouts(sd3: Path, tmp_path: Path) -> None:
    from loratool.formats import read_any

    k = tmp_path / "k.safetensors"
    run_cli("convert", sd3 / "lora", "--to", "kohya", "--base", sd3 / "transformer", "-o", k)
    stems = {n.split(".")[0] for n in load_file(k)}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv",
            "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_context_embedder"} <= stems
    save_file(load_file(k), tmp_path / "foreign.safetensors")  # no name record
    orig = read_any(str(sd3 / "lora"))
    back = read_any(str(tmp_path / "foreign.safetensors"), str(sd3 / "transformer"))
    by_name = {m.name: m for m in back.modules.values()}
    assert set(by_name) == {m.name for m in orig.modules.values()}
    for m in orig.modules.values():
        assert torch.allclose(by_name[m.name].delta(torch.float64), m.delta(torch.float64),
                              rtol=0, atol=1e-7), m.name
    # into the diffusers folder, and into the original single file by its own names
    run_cli("merge", sd3 / "transformer", sd3 / "lora", "-o", tmp_path / "ref")
    run_cli("merge", sd3 / "sd3.safetensors", tmp_path / "foreign.safetensors", "-o",
            tmp_path / "merged.safetensors", "--verify")
    from diffusers import SD3Transformer2DModel

    got = SD3Transformer2DModel.from_single_file(
        tmp_path / "merged.safetensors", config=str(sd3 / "transformer"),
        subfolder=None).state_dict()
    want = load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(got[n], want[n], rtol=0, atol=1e-6) for n in want)


def test_prefixed_single_file(sd3: Path, tmp_path: Path) -> None:
    """The same original file under ``model.diffusion_model.`` (as ComfyUI saves whole
    checkpoints): kohya names still find their tensors."""
    k = tmp_path / "k.safetensors"
    run_cli("convert", sd3 / "lora", "--to", "kohya", "--base", sd3 / "transformer", "-o", k)
    save_file(load_file(k), tmp_path / "foreign.safetensors")
    plain = load_file(sd3 / "sd3.safetensors")
    save_file({"model.diffusion_model." + n: t for n, t in plain.items()},
              tmp_path / "prefixed.safetensors")
    run_cli("merge", sd3 / "sd3.safetensors", tmp_path / "foreign.safetensors", "-o",
            tmp_path / "a.safetensors")
    run_cli("merge", tmp_path / "prefixed.safetensors", tmp_path / "foreign.safetensors", "-o",
            tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(t, b["model.diffusion_model." + n]) for n, t in a.items())
    assert any(not torch.equal(t, plain[n]) for n, t in a.items())
