"""Benchmark ``loratool extract`` side by side with mergekit and a kohya-style full SVD.

Two synthetic pairs (bf16; fine-tune = base + a rank-16 change + noise at 5 % of it, on every
attention and MLP matrix; embeddings, norms and lm_head unchanged):
  * "350M": Llama-shaped, hidden 1024, intermediate 2816, 24 layers, vocab 32000
  * "7B-layers": hidden 4096, intermediate 11008, 2 layers, vocab 32000
Tools, each a fresh process, at rank 16:
  * ``loratool extract BASE TUNED -o OUT --rank 16``   (randomized SVD)
  * ``mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 16``
  * kohya-style: a full ``torch.linalg.svd`` per matrix, up = U·S, down = Vh (the script
    below; it also records the exact optimum ‖ΔW − best rank-16‖/‖ΔW‖ per matrix from S)
Reports wall time, peak RSS and, per tool, the largest ratio of its error to the optimum.

Usage: python benchmarks/bench_extract.py [--pairs 350M 7B-layers] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_merge import build_in_child, run  # noqa: E402  (the benchmarks' shared helpers)

PAIRS = {"350M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=64),
         "7B-layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                           num_attention_heads=32, num_key_value_heads=32, head_dim=128)}

KOHYA = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[4])
from loratool.io.tensors import open_checkpoint
base, tuned, out = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2]), Path(sys.argv[3])
rank, state, optimum = 16, {}, {}
for name in base.tensors:
    if not (name.endswith(".weight") and len(base.info(name).shape) == 2 and ".layers." in name):
        continue
    d = tuned.load(name, dtype=torch.float32) - base.load(name, dtype=torch.float32)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)          # the full SVD
    optimum[name] = float((S[rank:].double() ** 2).sum().sqrt() / (S.double() ** 2).sum().sqrt())
    stem = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
    up, down = U[:, :rank] * S[:rank], Vh[:rank]
    # kohya's default clamp to the 0.99 quantile of all values (clamp_quantile=0.99)
    q = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs()[:2**24], 0.99)
    state[stem + ".lora_up.weight"] = up.clamp(-q, q).to(torch.bfloat16).contiguous()
    state[stem + ".lora_down.weight"] = down.clamp(-q, q).to(torch.bfloat16).contiguous()
    state[stem + ".alpha"] = torch.tensor(float(rank))
out.mkdir(parents=True, exist_ok=True)
save_file(state, out / "lora.safetensors")
(out / "optimum.json").write_text(json.dumps(optimum))
'''

ERRORS = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from loratool.formats import read_adapter
from loratool.io.tensors import open_checkpoint
base, tuned = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2])
ad = read_adapter(sys.argv[3], sys.argv[1])
errs = {}
for m in ad.modules.values():
    name = m.name + ".weight"
    d = tuned.load(name, dtype=torch.float32) - base.load(name, dtype=torch.float32)
    errs[name] = float((d - m.delta()).norm() / d.norm())
print(json.dumps(errs))
'''


def build(work: Path, pair: str) -> tuple[Path, Path]:
    import torch

    sys.path.insert(0, str(ROOT))
    from loratool.io.writer import CheckpointWriter
    from loratool.verbs.demo import llama_shapes

    base, tuned = work / f"{pair}-base", work / f"{pair}-tuned"
    if (tuned / "config.json").exists():
        return base, tuned
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "tie_word_embeddings": False, "dtype": "bfloat16", **PAIRS[pair]}
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(base, force=True, max_shard_size="2GB") as wb, \
            CheckpointWriter(tuned, force=True, max_shard_size="2GB") as wt:
        for w in (wb, wt):
            w.add_file("config.json", json.dumps(cfg, indent=2))
        for name, shape in llama_shapes(cfg):
            t = torch.randn(shape, generator=g) * 0.02 if len(shape) == 2 else torch.ones(shape)
            wb.add(name, t.to(torch.bfloat16))
            if len(shape) == 2 and ".layers." in name:
                d = torch.randn(shape[0], 16, generator=g) @ torch.randn(16, shape[1],
                                                                          generator=g)
                d *= 0.05 * t.norm() / d.norm()
                n = torch.randn(shape, generator=g)
                t = t + d + n * (0.05 * d.norm() / n.norm())
            wt.add(name, t.to(torch.bfloat16))
    return base, tuned


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "extract")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--peers", type=Path, default=ROOT / "bench-work" / "peers" / "bin")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        for p in args.pairs:
            build(args.work, p)
        return
    build_in_child(__file__, "--work", str(args.work), "--pairs", *args.pairs)
    py = sys.executable
    print(f"{args.repeat} run(s) each, alternating; median wall, max peak RSS\n")
    print("| pair | tool | wall (s) | peak RSS (MiB) | worst error / optimum | "
          "median error / optimum |")
    print("|---|---|---:|---:|---:|---:|")
    for pair in args.pairs:
        base, tuned = args.work / f"{pair}-base", args.work / f"{pair}-tuned"
        outs = {"loratool extract": args.work / "out-loratool",
                "mergekit-extract-lora": args.work / "out-mergekit",
                "kohya-style full SVD": args.work / "out-kohya"}
        cmds = {
            "loratool extract": [py, "-m", "loratool", "extract", str(base), str(tuned), "-o",
                                 str(outs["loratool extract"]), "--rank", "16", "--device",
                                 "cpu"],
            "mergekit-extract-lora": [str(args.peers / "mergekit-extract-lora"), "--model",
                                      str(tuned), "--base-model", str(base), "--out-path",
                                      str(outs["mergekit-extract-lora"]), "--max-rank", "16",
                                      "--device", "cpu"],
            "kohya-style full SVD": [py, "-c", KOHYA, str(base), str(tuned),
                                     str(outs["kohya-style full SVD"]), str(ROOT)],
        }
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                shutil.rmtree(outs[name], ignore_errors=True)
                res[name].append(run(cmd))
        optimum = json.loads((outs["kohya-style full SVD"] / "optimum.json").read_text())
        for name in cmds:
            path = outs[name]
            if name == "kohya-style full SVD":
                path = path / "lora.safetensors"
            errs = json.loads(subprocess.run([py, "-c", ERRORS, str(base), str(tuned),
                                              str(path), str(ROOT)], capture_output=True,
                                             text=True, check=True).stdout)
            ratios = sorted(errs[k] / optimum[k] for k in optimum if k in errs)
            wall = statistics.median(w for w, _ in res[name])
            rss = max(m for _, m in res[name])
            print(f"| {pair} | {name} | {wall:.2f} | {rss:.0f} | {ratios[-1]:.4f} | "
                  f"{ratios[len(ratios) // 2]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
