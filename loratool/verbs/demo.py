"""``loratool demo``: a tour on a small Llama-style model built here, with no network.

It writes a base model and a "fine-tuned" copy (the base plus a low-rank change and a little
noise in the attention and MLP weights, as a real fine-tune looks) as transformers-loadable
folders, then runs each command that exists on them and returns what they found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..errors import LoraToolError, OutputError
from ..formats import peft
from ..io.tensors import open_checkpoint
from ..io.writer import CheckpointWriter
from ..model.adapter import LoraAdapter, LoraModule
from ..options import Options, RankPolicy
from ..progress import SILENT, Progress
from .combine import combine, resize
from .convert import convert
from .export import export
from .extract import extract
from .inspect import inspect
from .merge import merge, unmerge

MARKER = ".loratool-demo"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}


def llama_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a LlamaForCausalLM with this config, in transformers' order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def build_pair(workdir: Path, cfg: dict[str, object] | None = None, rank: int = 8,
               seed: int = 0, max_shard_size: str = "2MB", options: Options | None = None
               ) -> tuple[Path, Path, Path]:
    """Write ``workdir/base``, ``workdir/tuned`` (sharded safetensors, bf16) and
    ``workdir/adapter`` (PEFT).

    The tuned model changes every attention and MLP matrix by a rank-``rank`` update plus
    noise 1 % of its size; embeddings, norms and lm_head are unchanged. The adapter holds the
    rank-``rank`` updates alone (what a LoRA fine-tune would have trained).
    """

    adapter = LoraAdapter(base_model=str(workdir / "base"), task_type="CAUSAL_LM",
                          source_format="peft")

    cfg = dict(cfg or CONFIG)
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(cfg)
    paths = (workdir / "base", workdir / "tuned")
    writers = [CheckpointWriter(p, force=True, max_shard_size=max_shard_size, options=options)
               for p in paths]
    for w in writers:
        w.add_file("config.json", json.dumps(cfg, indent=2) + "\n")
        w.add_file("generation_config.json", json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n")
    with writers[0] as wb, writers[1] as wt:
        for name, shape in shapes:
            if len(shape) == 1:
                base = 1.0 + 0.02 * torch.randn(shape, generator=g)
            else:
                base = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            tuned = base
            if len(shape) == 2 and (".self_attn." in name or ".mlp." in name):
                b = torch.randn(shape[0], rank, generator=g)
                a = torch.randn(rank, shape[1], generator=g)
                gain = (0.05 * base.norm() / (b @ a).norm()).sqrt()
                b, a = b * gain, a * gain
                delta = b @ a
                adapter.add(LoraModule(name.removesuffix(".weight"), a.to(torch.bfloat16),
                                       b.to(torch.bfloat16), float(rank)))
                noise = torch.randn(shape, generator=g)
                noise *= 0.01 * delta.norm() / noise.norm()
                tuned = base + delta + noise
            wb.add(name, base.to(torch.bfloat16))
            wt.add(name, tuned.to(torch.bfloat16))
    peft.write(adapter, workdir / "adapter", force=True,
               note="The demo adapter of `loratool demo`.", options=options)
    return (*paths, workdir / "adapter")


def _shown(command: str, output: str, note: str = "") -> str:
    """A demo section: the command line, then exactly what that command prints."""
    return f"$ loratool {command}\n{output}\n" + (f"({note})\n" if note else "")


def run_demo(workdir: Path, options: Options | None = None, progress: Progress = SILENT
             ) -> Iterator[str]:
    """Build the demo models in ``workdir`` and yield, per command, the command line and what
    it prints."""
    options = options or Options()
    if workdir.exists() and not workdir.is_dir():
        raise OutputError(f"--workdir {workdir} is a file; pass a folder")
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise OutputError(f"{workdir} exists and is not a loratool demo folder; pass another "
                          "--workdir (the demo only overwrites its own folder)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("written by `loratool demo`; safe to delete\n")
    base, tuned, adapter = build_pair(workdir, options=options)
    yield (f"Built a small Llama-style model in {base}, a fine-tuned copy in {tuned}\n"
           "(bf16, sharded; every attention and MLP matrix changed by a rank-8 update and a\n"
           f"little noise) and a PEFT adapter holding those rank-8 updates in {adapter}.\n")
    yield from _inspect(base, tuned, adapter, progress)
    yield from _convert(workdir, base, adapter, options)
    yield from _merge(workdir, base, adapter, options, progress)
    yield from _extract_combine(workdir, base, tuned, adapter, options, progress)
    yield from _export(workdir, base, adapter, options, progress)
    yield ("Next: `loratool push <folder> <you>/<repo>` publishes any of these folders with a "
           "model card; `loratool pull` brings one back.")


def _inspect(base: Path, tuned: Path, adapter: Path, progress: Progress) -> Iterator[str]:
    yield _shown(f"inspect {base}", inspect(base).render())
    layer0 = ["*layers.0.*"]
    yield _shown(f"inspect {tuned} --against {base} --filter '*layers.0.*'",
                 inspect(tuned, filters=layer0, against=base, progress=progress).render())
    yield _shown(f"inspect {adapter} --filter '*layers.0.*'",
                 inspect(adapter, filters=layer0).render())


def _convert(workdir: Path, base: Path, adapter: Path, options: Options) -> Iterator[str]:
    for to, out in (("kohya", workdir / "adapter-kohya.safetensors"),
                    ("diffusers", workdir / "adapter-diffusers"),
                    ("gguf", workdir / "adapter.gguf")):
        rep = convert(adapter, out, to, base=str(base), force=True, options=options)
        yield _shown(f"convert {adapter} --format {to} -o {out} --base {base} --force",
                     rep.render())
    kohya = workdir / "adapter-kohya.safetensors"
    rep = convert(kohya, workdir / "adapter-back", "peft", force=True, options=options)
    yield _shown(f"convert {kohya} --format peft -o {workdir / 'adapter-back'} --force",
                 rep.render(), "module names restored from the kohya file's header")


def _merge(workdir: Path, base: Path, adapter: Path, options: Options, progress: Progress
           ) -> Iterator[str]:
    merged, again = workdir / "merged", workdir / "unmerged"
    rep = merge(base, [adapter], merged, force=True, verify=True, device="cpu",
                options=options, progress=progress)
    yield _shown(f"merge {base} {adapter} -o {merged} --verify --device cpu --force",
                 rep.render())
    back_rep = unmerge(merged, [adapter], again, force=True, device="cpu", options=options,
                       progress=progress)
    same = total = 0
    orig, back = open_checkpoint(base), open_checkpoint(again)
    for name in orig.tensors:
        a, b = back.load(name), orig.load(name)
        same += int((a == b).sum())
        total += a.numel()
    fixed = back_rep.exact.values if back_rep.exact else 0
    yield _shown(f"unmerge {merged} {adapter} -o {again} --device cpu --force",
                 back_rep.render(), f"{same / total:.2%} of all values are the base's bit for "
                 f"bit after this bf16 merge → unmerge: {(same - fixed) / total:.2%} by the "
                 f"round trip itself, the other {fixed:,} (low bits lost when the merged values "
                 "were rounded to bf16) from the merge's exact record")


def _extract_combine(workdir: Path, base: Path, tuned: Path, adapter: Path,
                     options: Options, progress: Progress) -> Iterator[str]:

    rank8 = RankPolicy.rank(8)
    ex = workdir / "extracted"
    rep = extract(base, tuned, ex, policy=rank8, force=True, device="cpu", options=options,
                  progress=progress)
    yield _shown(f"extract {base} {tuned} -o {ex} --rank 8 --device cpu --force",
                 rep.render(), "the fine-tune is a rank-8 change plus noise: the error "
                 "left is that noise and the bf16 rounding of both models")
    both = combine([adapter, ex], workdir / "combined", "cat", weights=[0.5, 0.5],
                   force=True, options=options, progress=progress)
    yield _shown(f"combine {adapter} {ex} --method cat --weight 0.5 --weight 0.5 -o "
                 f"{workdir / 'combined'} --force", both.render())
    small = resize(workdir / "combined", workdir / "resized", policy=rank8, force=True,
                   options=options, progress=progress)
    yield _shown(f"resize {workdir / 'combined'} --rank 8 -o {workdir / 'resized'} --force",
                 small.render(), "both adapters span nearly the same rank-8 subspace")


def _export(workdir: Path, base: Path, adapter: Path, options: Options, progress: Progress
            ) -> Iterator[str]:
    try:
        rep = export(base, [adapter], workdir / "onnx", force=True, options=options,
                     progress=progress)
    except LoraToolError as e:
        if "loratool[onnx]" not in str(e):
            raise
        yield f"(export skipped: {e})\n"
        return
    yield _shown(f"export {base} {adapter} -o {workdir / 'onnx'} --force", rep.render())
