"""Flux: kohya sd-scripts names Flux LoRA by BFL's fused modules (``double_blocks_0_img_attn_qkv``
holds diffusers' to_q, to_k and to_v). A tiny FluxTransformer2DModel built in code, LoRA made
with PEFT and saved by diffusers; loratool's kohya file is loaded by diffusers' own Flux
converter, and read back, merged and converted against the diffusers model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli as run_cli
from conftest import lycoris_network
from safetensors.torch import load_file, save_file


def tiny_flux():  # type: ignore[no-untyped-def]
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


# what diffusers' converter can take back: it fixes a single block's linear1 split at Flux-dev's
# sizes (3072 ×3, 12288), so that module is left to the other test
DOUBLE = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|"
          r"to_out\.0|to_add_out)|ff\.net\.0\.proj|ff_context\.net\.2|norm1\.linear)|"
          r"single_transformer_blocks\.\d+\.(proj_out|norm\.linear)|norm_out\.linear|"
          r"x_embedder|time_text_embed\.timestep_embedder\.linear_1)")
ALL = ["to_q", "to_k", "to_v", "add_q_proj", "add_v_proj", "to_out.0", "proj_mlp", "proj_out",
       "norm.linear", "norm_out.linear", "context_embedder"]


def make_lora(d: Path, targets: object, name: str) -> Path:
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = tiny_flux()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(3)
    inject_adapter_in_model(cfg, model)
    FluxPipeline.save_lora_weights(d / name, transformer_lora_layers=get_peft_model_state_dict(
        model), transformer_lora_adapter_metadata=cfg.to_dict())
    return d / name


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("flux")
    tiny_flux().save_pretrained(d / "transformer")
    make_lora(d, DOUBLE, "double")
    make_lora(d, ALL, "all")
    return d


def run(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(5)
    x, txt = torch.randn(1, 16, 4, generator=g), torch.randn(1, 3, 8, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=txt,
                     pooled_projections=torch.randn(1, 8, generator=g),
                     timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(3, 3),
                     guidance=torch.tensor([3.5])).sample


def with_adapter(folder: Path, state: object) -> torch.Tensor:
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
    if isinstance(state, Path):
        m.load_lora_adapter(state, prefix="transformer",
                            weight_name="pytorch_lora_weights.safetensors")
    else:
        m.load_lora_adapter(state, prefix="transformer")
    return run(m)


def test_kohya_flux_file_loads_in_diffusers(flux: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    k = tmp_path / "flux.safetensors"
    res = run_cli("convert", flux / "double", "--to", "kohya", "--base", flux / "transformer",
                  "-o", k, "--json")
    told = json.loads(res.out)["diffusers_drops"]
    stems = {n.split(".")[0] for n in load_file(k)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in",
            "lora_unet_single_blocks_0_linear2", "lora_unet_time_in_in_layer"} <= stems
    assert not any("transformer_blocks" in s for s in stems)
    want = with_adapter(flux, flux / "double")
    assert (want - run(tiny_flux())).abs().max() > 1e-2  # the adapter matters
    state = FluxPipeline.lora_state_dict(str(k))  # diffusers' own kohya-Flux converter
    state = state[0] if isinstance(state, tuple) else state
    # the modules its converter leaves without the transformer. prefix are left out when it
    # loads them (the output then differs): the report names as many as diffusers drops
    dropped = {n.split(".lora")[0] for n in state if not n.startswith("transformer.")}
    assert dropped and len(told) == len(dropped), (told, dropped)
    assert set(told) <= stems
    partial = with_adapter(flux, {n: t for n, t in state.items()
                                  if n.startswith("transformer.")})
    assert not torch.allclose(partial, want, rtol=1e-5, atol=1e-5)
    # it leaves x_embedder, norm_out.linear and the time embedder without the prefix that
    # load_lora_adapter selects by (FluxPipeline.load_lora_weights adds it)
    state = {(n if n.startswith("transformer.") else "transformer." + n): t
             for n, t in state.items()}
    got = with_adapter(flux, state)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_bfl_names_read_back_merge_and_convert(flux: Path, tmp_path: Path) -> None:
    """Every fused module (single blocks' linear1 too), read back from a file without
    loratool's name record: the same ΔW per diffusers module, and the merge equals PEFT's
    merge of the original adapter."""
    from loratool.formats import read_any

    k = tmp_path / "all.safetensors"
    run_cli("convert", flux / "all", "--to", "kohya", "--base", flux / "transformer", "-o", k)
    stems = {n.split(".")[0] for n in load_file(k)}
    assert "lora_unet_single_blocks_1_linear1" in stems
    save_file(load_file(k), tmp_path / "foreign.safetensors")  # as sd-scripts writes it
    orig = read_any(str(flux / "all"))
    back = read_any(str(tmp_path / "foreign.safetensors"), str(flux / "transformer"))
    assert {m.name for m in back.modules.values()} == {m.name for m in orig.modules.values()}
    by_name = {m.name: m for m in back.modules.values()}
    for m in orig.modules.values():
        assert torch.allclose(by_name[m.name].delta(torch.float64), m.delta(torch.float64),
                              rtol=0, atol=1e-7), m.name
    run_cli("merge", flux / "transformer", tmp_path / "foreign.safetensors", "-o",
            tmp_path / "m")
    run_cli("merge", flux / "transformer", flux / "all", "-o", tmp_path / "ref")
    a = load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-6) for n in b)
    run_cli("convert", tmp_path / "foreign.safetensors", "--to", "diffusers", "--base",
            flux / "transformer", "-o", tmp_path / "d")
    assert torch.allclose(with_adapter(flux, tmp_path / "d"), with_adapter(flux, flux / "all"),
                          rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_own_names_on_a_flux_transformer(tmp_path: Path, algo: str) -> None:
    """LyCORIS wrapping a diffusion transformer itself (create_lycoris, lycoris_<path> names,
    alpha ≠ dim): merged into the transformer folder, it gives the output of the transformer
    with the LyCORIS network applied (LyCORIS' own forward)."""
    model = tiny_flux()
    model.save_pretrained(tmp_path / "transformer")
    net = lycoris_network(model, ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
                          alpha=2, algo=algo)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    keys = load_file(path)
    assert keys and all(k.startswith("lycoris_") for k in keys)
    want = run(model)  # LyCORIS' forward: the network applied
    assert (want - run(tiny_flux())).abs().max() > 1e-3  # the network matters
    res = run_cli("merge", tmp_path / "transformer", path, "-o", tmp_path / "m", "--json")
    assert json.loads(res.out)["tensors_changed"] == len(net.loras)
    from diffusers import FluxTransformer2DModel

    got = run(FluxTransformer2DModel.from_pretrained(tmp_path / "m").eval())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
