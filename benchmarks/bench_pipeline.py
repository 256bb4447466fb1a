"""Benchmark ``loratool merge`` of a LoRA into a whole diffusers pipeline, beside the I/O floor
and diffusers' own way (load the pipeline, ``load_lora_weights``, ``fuse_lora``,
``save_pretrained``).

The pipeline: SDXL's shape at reduced depth (UNet block widths 320/640/1280, 2 layers per
block, one transformer layer per attention block, cross-attention 2048; two CLIP-L-sized text
encoders), fp16, random weights, built in code; the adapter: rank 16 on the UNet's attention
(to_q, to_k, to_v, to_out.0) and the text encoders' q/k/v/out projections, saved by diffusers.
Commands, each a fresh process, alternating:
  * ``cp -r PIPE OUT``                                     the I/O floor (no fsync)
  * ``loratool merge PIPE LORA -o OUT``                   (LORATOOL_NO_FSYNC=1, like cp)
  * diffusers: from_pretrained → load_lora_weights → fuse_lora → save_pretrained
Reports median wall time and peak RSS.

Usage: python benchmarks/bench_pipeline.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

sys.path.insert(0, str(ROOT / "tests"))

from bench_merge import build_in_child, run  # noqa: E402
from test_pipeline import _tokenizer  # noqa: E402  (letters only: nothing to download)

DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
pipe.load_lora_weights(sys.argv[2])
pipe.fuse_lora()
pipe.unload_lora_weights()
pipe.save_pretrained(sys.argv[3])
"""


def build(work: Path) -> tuple[Path, Path]:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pipe_dir, lora = work / "pipe", work / "lora"
    if (pipe_dir / "model_index.json").is_file() and lora.is_dir():
        return pipe_dir, lora
    torch.manual_seed(0)
    te = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=1280, vocab_size=49408, hidden_act="gelu")
    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 1, 1), addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256,
        use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    te1 = CLIPTextModel(CLIPTextConfig(**te))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=_tokenizer(work / "tok"),
                                     tokenizer_2=_tokenizer(work / "tok2"), unet=unet,
                                     scheduler=EulerDiscreteScheduler())
    pipe.to(torch.float16).save_pretrained(pipe_dir)
    layers = {}
    for name, targets in (("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
                          ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj"]),
                          ("text_encoder_2", ["q_proj", "k_proj", "v_proj", "out_proj"])):
        model = getattr(pipe, name)
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets,
                                           init_lora_weights=False), model)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
    StableDiffusionXLPipeline.save_lora_weights(lora, **layers)
    return pipe_dir, lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "pipeline")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.work)
        return
    # build in a child: a parent holding torch would inflate the children's peak RSS
    build_in_child(__file__, "--work", str(args.work))
    pipe, lora = args.work / "pipe", args.work / "lora"
    size = sum(f.stat().st_size for f in pipe.rglob("*") if f.is_file())
    out = args.work / "out"
    loratool = str(Path(sys.executable).parent / "loratool")
    env = {**os.environ, "LORATOOL_NO_FSYNC": "1"}
    cmds = {"cp -r": ["cp", "-r", str(pipe), str(out)],
            "loratool merge": [loratool, "-q", "merge", str(pipe), str(lora), "-o", str(out)],
            "diffusers fuse_lora": [sys.executable, "-c", DIFFUSERS, str(pipe), str(lora),
                                    str(out)]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, float] = {k: 0.0 for k in cmds}
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            shutil.rmtree(out, ignore_errors=True)
            t, m = run(cmd, env)
            times[name].append(t)
            rss[name] = max(rss[name], m)
    shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times["loratool merge"])
    print(f"pipeline {size / 1e9:.2f} GB (fp16), LoRA rank 16 on 3 components, "
          f"{args.repeat} runs, medians:")
    print("| command | seconds | × loratool | peak RSS |")
    print("|---|---|---|---|")
    for name in cmds:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {med / base:.2f} | {rss[name]:.0f} MiB |")


if __name__ == "__main__":
    main()
