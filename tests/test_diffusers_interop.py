"""kohya and diffusers files written by loratool, loaded by diffusers itself into a tiny UNet:
the outputs equal those of the adapter diffusers trained and saved."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    d = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=4)
    unet.save_pretrained(d / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "conv1"], rank_pattern={"conv1": 2},
        init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        d / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    x, t, enc = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32)
    with torch.no_grad():
        ref = unet(x, t, enc).sample
    return d, (x, t, enc), ref


def _run(d, inputs, load):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(d / "unet")
    load(unet)
    with torch.no_grad():
        return unet(*inputs).sample


def test_diffusers_output_loads_in_diffusers(sd, tmp_path):
    """diffusers' own save → reload is the standard: it differs from the in-memory model by
    rounding that depends on the diffusers version (8e-7 with 0.42), so ours must give what
    diffusers' own file gives, bit for bit, and nothing tighter is asked of it."""
    d, inputs, ref = sd
    res = run_cli("convert", d / "lora", "--to", "diffusers", "-o", tmp_path / "out")
    assert res.rc == 0, res.err
    ours = _run(d, inputs, lambda u: u.load_lora_adapter(
        tmp_path / "out", prefix="unet", weight_name="pytorch_lora_weights.safetensors"))
    theirs = _run(d, inputs, lambda u: u.load_lora_adapter(
        d / "lora", prefix="unet", weight_name="pytorch_lora_weights.safetensors"))
    assert torch.equal(ours, theirs)
    assert torch.allclose(theirs, ref, atol=1e-5)  # and that is the adapter that was trained


@pytest.mark.parametrize("strip_names", [False, True])
def test_kohya_output_loads_through_diffusers_kohya_converter(sd, tmp_path, strip_names):
    """diffusers' own kohya→diffusers key conversion is the independent check of our names."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    d, inputs, ref = sd
    k = tmp_path / "k.safetensors"
    res = run_cli("convert", d / "lora", "--to", "kohya", "-o", k)
    assert res.rc == 0, res.err
    if strip_names:  # as a kohya file from elsewhere: names resolved against the base UNet
        save_file(load_file(k), tmp_path / "foreign.safetensors")
        back = tmp_path / "back"
        assert run_cli("convert", tmp_path / "foreign.safetensors", "--to", "diffusers", "-o",
                       back).rc == 1
        res = run_cli("convert", tmp_path / "foreign.safetensors", "--to", "diffusers", "-o",
                      back, "--base", d / "unet")
        assert res.rc == 0, res.err
        out = _run(d, inputs, lambda u: u.load_lora_adapter(
            back, prefix="unet", weight_name="pytorch_lora_weights.safetensors"))
        assert torch.allclose(out, ref, atol=1e-6)
        return

    def load(unet):
        state, alphas = StableDiffusionPipeline.lora_state_dict(k)
        unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas)

    assert torch.allclose(_run(d, inputs, load), ref, atol=1e-6)
