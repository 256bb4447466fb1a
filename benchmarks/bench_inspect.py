"""Benchmark ``loratool inspect`` on a sharded checkpoint of about 2 GB.

Side by side in one run, alternating, each a fresh process:
  * ``loratool inspect DIR --json``                  (headers only, no torch import)
  * ``python -c "import torch"``                      (the floor for any torch-based tool)
  * listing every tensor with ``safetensors.safe_open``  (what a script would do by hand)
  * ``loratool inspect BASE --against TUNED --json``  (reads every tensor of both; once)
Reports median wall time and peak RSS of each child process (``wait4``).

Usage: python benchmarks/bench_inspect.py [--workdir bench-work] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import build_in_child  # the benchmarks' shared helpers (same folder)

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 16,
          "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}

SAFE_OPEN_LIST = """
import json, sys
from pathlib import Path
from safetensors import safe_open
d = Path(sys.argv[1])
index = json.loads((d / "model.safetensors.index.json").read_text())
files = sorted(set(index["weight_map"].values()))
n = 0
for f in files:
    with safe_open(d / f, "pt") as h:
        for k in h.keys():
            s = h.get_slice(k); s.get_shape(); s.get_dtype(); n += 1
print(n)
"""


def build(workdir: Path) -> tuple[Path, Path]:
    """Write base and tuned (base + a small change in every matrix) once; reuse afterwards."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loratool.io.writer import CheckpointWriter
    from loratool.verbs.demo import llama_shapes

    base, tuned = workdir / "base", workdir / "tuned"
    if (tuned / "model.safetensors.index.json").exists():
        return base, tuned
    shutil.rmtree(workdir, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(base, max_shard_size="200MB") as wb, \
            CheckpointWriter(tuned, max_shard_size="200MB") as wt:
        for w in (wb, wt):
            w.add_file("config.json", json.dumps(CONFIG, indent=2))
        for name, shape in llama_shapes(CONFIG):
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
            wb.add(name, t)
            if len(shape) == 2 and ".layers." in name:
                t = t + (0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            wt.add(name, t)
    return base, tuned


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MiB, stdout of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="bench-work", type=Path)
    ap.add_argument("--repeat", default=7, type=int)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.workdir)
        return
    # Build in a child: a parent holding torch would inflate every child's peak RSS (fork
    # copies the parent's resident pages into the child's accounting before exec).
    build_in_child(__file__, "--workdir", str(args.workdir))
    base, tuned = args.workdir / "base", args.workdir / "tuned"
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    py = sys.executable
    loratool = [py, "-m", "loratool"]
    cases = {
        "loratool inspect --json": loratool + ["inspect", str(base), "--json"],
        "python -c 'import torch'": [py, "-c", "import torch"],
        "safetensors safe_open listing": [py, "-c", SAFE_OPEN_LIST, str(base)],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeat):  # alternate, so a noisy neighbour hits all alike
        for name, cmd in cases.items():
            wall, rss, _ = run(cmd)
            results[name].append((wall, rss))
    wall, rss, out = run(loratool + ["inspect", str(base), "--against", str(tuned), "--json"])
    changed = len(json.loads(out)["compare"]["changed"])
    largest = max(t["bytes"] for t in json.loads(run(cases["loratool inspect --json"])[2])
                  ["tensors"])
    print(f"checkpoint: {size / 1e9:.2f} GB in {shards} shards (bf16, Llama-shaped, "
          f"{len(json.loads(run(cases['loratool inspect --json'])[2])['tensors'])} tensors); "
          f"largest tensor {largest / 2**20:.0f} MiB; {args.repeat} runs each, alternating\n")
    ref = statistics.median(w for w, _ in results["python -c 'import torch'"])
    print("| command | median wall (s) | vs import torch | peak RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        w = statistics.median(r[0] for r in rows)
        m = max(r[1] for r in rows)
        print(f"| {name} | {w:.3f} | {w / ref:.2f}× | {m:.0f} |")
    print(f"| loratool inspect --against (reads both, {changed} changed) | {wall:.2f} | "
          f"{wall / ref:.1f}× | {rss:.0f} |")


if __name__ == "__main__":
    main()
