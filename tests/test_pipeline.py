"""Whole diffusers pipelines: a tiny SDXL-style pipeline (UNet with SDXL's added conditioning,
two CLIP text encoders, VAE, scheduler, tokenizers) built in code, a three-component LoRA saved
by diffusers itself, and loratool's merge of the pipeline checked against diffusers'
``fuse_lora()`` on every component; kohya SDXL files (SGM UNet names) loaded by diffusers'
own converter."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from conftest import cli as run_cli
from safetensors.torch import load_file, save_file


def _tokenizer(d: Path):  # type: ignore[no-untyped-def]
    """A CLIP tokenizer with a vocabulary of single letters (nothing to download)."""
    from transformers import CLIPTokenizer

    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)


def build_sdxl(d: Path):  # type: ignore[no-untyped-def]
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               vocab_size=64, max_position_embeddings=16, projection_dim=8, hidden_act="gelu")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
        transformer_layers_per_block=1, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                        norm_num_groups=2, sample_size=16)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
        tokenizer=_tokenizer(d / "tok1"), tokenizer_2=_tokenizer(d / "tok2"), unet=unet,
        scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1",
                "time_emb_proj", "conv_shortcut", "linear_1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The pipeline folder and a diffusers LoRA file for unet, text_encoder, text_encoder_2
    (random, trained-looking factors; alpha ≠ r)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    d = tmp_path_factory.mktemp("sdxl")
    folder = build_sdxl(d)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    torch.manual_seed(1)
    layers, meta = {}, {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS),
                          ("text_encoder_2", TE_TARGETS)):
        model = getattr(pipe, name)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(cfg, model)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        meta[f"{name}_lora_adapter_metadata"] = cfg.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(d / "lora", **layers, **meta)
    return folder, d / "lora"


def generate(pipe) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(prompt="a red cat", num_inference_steps=2, height=16, width=16,
                    output_type="latent", generator=g, guidance_scale=1.0).images


def with_lora(folder: Path, lora: Path, fuse: bool = False):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora))
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def test_merge_pipeline_equals_fuse_lora(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """Every component of the merged pipeline equals diffusers' fuse_lora() bit for bit
    (float32); the rest of the folder is carried over; the merged pipeline runs."""
    from diffusers import StableDiffusionXLPipeline

    folder, lora = sdxl
    out = tmp_path / "merged"
    r = run_cli("merge", folder, lora, "-o", out, "--verify", "--json")
    report = json.loads(r.out)
    assert sorted(report["components"]) == sorted(COMPONENTS)
    assert {"vae", "scheduler", "tokenizer", "tokenizer_2", "model_index.json"} <= set(
        report["carried_over"])
    fused = with_lora(folder, lora, fuse=True)
    ours = StableDiffusionXLPipeline.from_pretrained(out)
    plain = StableDiffusionXLPipeline.from_pretrained(folder)
    for c in COMPONENTS:
        want, got, before = (getattr(p, c).state_dict() for p in (fused, ours, plain))
        assert set(want) == set(got), c
        changed = [k for k in want if not torch.equal(want[k], before[k])]
        assert len(changed) > 4, c
        for k in want:
            assert torch.equal(got[k], want[k]), (c, k)
    for name in ("vae", "scheduler", "tokenizer", "tokenizer_2"):
        a, b = sorted((folder / name).rglob("*")), sorted((out / name).rglob("*"))
        assert [p.relative_to(folder) for p in a] == [p.relative_to(out) for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b) if x.is_file())
    assert torch.allclose(generate(ours), generate(with_lora(folder, lora)), rtol=1e-4,
                          atol=1e-3)


def test_unmerge_pipeline_gives_it_back(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """Each component's merge records what the round trip loses: unmerge gives the pipeline
    back bit for bit; without that record, within float32 rounding."""
    folder, lora = sdxl
    run_cli("merge", folder, lora, "-o", tmp_path / "m")
    run_cli("unmerge", tmp_path / "m", lora, "-o", tmp_path / "u", "--verify")
    run_cli("merge", folder, lora, "-o", tmp_path / "m1", "--no-exact-record")
    run_cli("unmerge", tmp_path / "m1", lora, "-o", tmp_path / "u1")
    for c in COMPONENTS:
        f = next((folder / c).glob("*.safetensors")).name
        a, b = load_file(folder / c / f), load_file(tmp_path / "u" / c / f)
        rounded = load_file(tmp_path / "u1" / c / f)
        for k in a:
            assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), (c, k)
            assert torch.allclose(a[k], rounded[k], rtol=0, atol=1e-6), (c, k)


def test_pipeline_merge_refusals(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    folder, lora = sdxl
    only_unet = {k: v for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items()
                 if k.startswith("unet.")}
    save_file({k.replace("unet.", "prior.", 1): v for k, v in only_unet.items()},
              tmp_path / "prior.safetensors")
    r = run_cli("merge", folder, tmp_path / "prior.safetensors", "-o", tmp_path / "o",
                expect=1)
    assert "component prior" in r.err and not (tmp_path / "o").exists()


def test_kohya_sdxl_names_both_ways(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """With an SDXL base, kohya files name the UNet as sd-scripts does (SGM blocks); diffusers'
    own converter loads the file into the pipeline with the original adapter's output, and a
    file stripped of loratool's name record reads back to the same factors via --base."""
    folder, lora = sdxl
    k = tmp_path / "sdxl.safetensors"
    run_cli("convert", lora, "--to", "kohya", "--base", folder, "-o", k)
    keys = load_file(k)
    stems = {n.split(".")[0] for n in keys}
    assert any(s.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1") for s in
               stems) and any(s.startswith("lora_unet_output_blocks_") for s in stems)
    assert any(s.startswith("lora_unet_middle_block_1_") for s in stems)
    assert not any("down_blocks" in s or "up_blocks" in s for s in stems)
    assert any(s.startswith("lora_te1_") for s in stems) and any(
        s.startswith("lora_te2_") for s in stems)
    # text encoders as sd-scripts names them, with CLIP's text_model wrapper, whether the base
    # stores it (CLIPTextModelWithProjection) or not (CLIPTextModel, saved by transformers 5)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" not in load_file(
        folder / "text_encoder" / "model.safetensors")
    te = [s for s in stems if s.startswith(("lora_te1_", "lora_te2_"))]
    assert te and all(s.startswith(("lora_te1_text_model_", "lora_te2_text_model_"))
                      for s in te), te
    want = generate(with_lora(folder, lora))
    assert torch.allclose(generate(with_lora(folder, k)), want, rtol=1e-5, atol=1e-4)
    # as sd-scripts would write it: no name record; --base resolves the SGM names
    save_file(keys, tmp_path / "foreign.safetensors")
    back = tmp_path / "back"
    run_cli("convert", tmp_path / "foreign.safetensors", "--to", "diffusers", "--base", folder,
            "-o", back)
    a = load_file(lora / "pytorch_lora_weights.safetensors")
    b = load_file(back / "pytorch_lora_weights.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    # the other spelling too: text encoders named without the wrapper, both of them
    bare = {k.replace("_te1_text_model_", "_te1_").replace("_te2_text_model_", "_te2_"): v
            for k, v in keys.items()}
    assert bare.keys() != keys.keys()
    save_file(bare, tmp_path / "bare.safetensors")
    run_cli("convert", tmp_path / "bare.safetensors", "--to", "diffusers", "--base", folder,
            "-o", tmp_path / "back-bare")
    c = load_file(tmp_path / "back-bare" / "pytorch_lora_weights.safetensors")
    assert set(a) == set(c) and all(torch.equal(a[n], c[n]) for n in a)
    # and merged into the pipeline straight from the SGM-named file: fuse_lora's weights
    run_cli("merge", folder, tmp_path / "foreign.safetensors", "-o", tmp_path / "m")
    from diffusers import UNet2DConditionModel

    fused = with_lora(folder, lora, fuse=True).unet.state_dict()
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet").state_dict()
    assert all(torch.allclose(ours[n], fused[n], rtol=0, atol=1e-6) for n in fused)


def single_file(folder: Path, path: Path) -> None:
    """The pipeline's UNet and first text encoder as a single-file SDXL checkpoint stores them
    (``model.diffusion_model.`` + SGM names, ``conditioner.embedders.0.transformer.``); its
    second encoder stands in by one OpenCLIP-named tensor."""
    from loratool.formats.sgm_names import to_sgm

    config = json.loads((folder / "unet" / "config.json").read_text())
    sd = {}
    for n, t in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        mod, _, leaf = n.rpartition(".")
        sd[f"model.diffusion_model.{to_sgm(mod, config)}.{leaf}"] = t
    for n, t in load_file(folder / "text_encoder" / "model.safetensors").items():
        sd["conditioner.embedders.0.transformer." + n] = t
    sd["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(8)
    save_file(sd, path)


def test_merge_into_a_single_file_checkpoint(sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """kohya SDXL (SGM names) and diffusers adapters merge into a single-file checkpoint, one
    file out, equal to fuse_lora(): diffusers' own single-file loader reads the UNet back."""
    from diffusers import UNet2DConditionModel

    folder, lora = sdxl
    ckpt = tmp_path / "sdxl.safetensors"
    single_file(folder, ckpt)
    plain = UNet2DConditionModel.from_single_file(ckpt, config=str(folder), subfolder="unet")
    orig = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(t, orig[n]) for n, t in plain.state_dict().items())  # the layout
    k = tmp_path / "k.safetensors"
    run_cli("convert", lora, "--to", "kohya", "--base", folder, "-o", k)
    no_te2 = {n: t for n, t in load_file(k).items() if not n.startswith("lora_te2_")}
    save_file(no_te2, tmp_path / "unet_te1.safetensors")  # as sd-scripts writes it: no record
    from safetensors import safe_open

    with safe_open(lora / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = f.metadata()  # the per-component configs (alphas)
    d = load_file(lora / "pytorch_lora_weights.safetensors")
    save_file({n: t for n, t in d.items() if not n.startswith("text_encoder_2.")},
              tmp_path / "d.safetensors", metadata=meta)
    fused = with_lora(folder, lora, fuse=True)
    for adapter in (tmp_path / "unet_te1.safetensors", tmp_path / "d.safetensors"):
        out = tmp_path / f"merged-{adapter.stem}.safetensors"
        run_cli("merge", ckpt, adapter, "-o", out, "--verify")
        assert out.is_file()
        unet = UNet2DConditionModel.from_single_file(out, config=str(folder), subfolder="unet")
        want = fused.unet.state_dict()
        assert all(torch.equal(t, want[n]) for n, t in unet.state_dict().items()), adapter
        merged, te = load_file(out), fused.text_encoder.state_dict()
        p = "conditioner.embedders.0.transformer."
        assert all(torch.equal(merged[p + n], t) for n, t in te.items()), adapter
    r = run_cli("merge", ckpt, k, "-o", tmp_path / "x.safetensors", expect=1)
    assert "OpenCLIP" in r.err and not (tmp_path / "x.safetensors").exists()
