"""Merge throughput on CUDA against the CPU, in one go, on a machine with a GPU.

Builds a Llama-shaped bf16 base (hidden 4096, intermediate 11008 by default) and a rank-16
adapter on every attention and MLP matrix, then runs ``loratool merge`` with ``--device cuda``
and ``--device cpu`` (each once warm-up, then timed), checks that both outputs agree to float
rounding, and prints one JSON object with wall times, GB/s and peak memory.

Usage (from the repository root, loratool installed):
    python benchmarks/gpu_merge.py [--layers 8] [--work /tmp/loratool-gpu]
Then run the GPU tests too: python -m pytest -q -m gpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_merge import build, config  # noqa: E402


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/loratool-gpu"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    import bench_merge

    def big(layers: int) -> dict:
        c = config(layers)
        c.update(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128)
        return c

    bench_merge.config = big  # the 7B-like shapes
    base, adapter = build(args.work, args.layers)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    result: dict = {"gpu": torch.cuda.get_device_name(0), "base_gb": size / 1e9,
                    "layers": args.layers}
    for dev in ("cuda", "cpu"):
        out = args.work / f"out-{dev}"
        runs = []
        for _ in range(2):  # the first run warms the page cache and CUDA
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "loratool", "merge", str(base),
                                  str(adapter), "-o", str(out), "--device", dev, "--json"],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(res.stderr)
            rep = json.loads(res.stdout)
            rep["process_seconds"] = time.perf_counter() - t0
            runs.append(rep)
        rep = runs[-1]
        result[dev] = {k: rep.get(k) for k in ("seconds", "process_seconds", "gb_per_s",
                                                 "peak_rss_mb", "peak_gpu_mb")}
    sys.path.insert(0, str(ROOT))
    from loratool.io.tensors import open_checkpoint

    a, b = open_checkpoint(args.work / "out-cuda"), open_checkpoint(args.work / "out-cpu")
    worst, differ = 0.0, 0
    for name in a.tensors:
        x, y = a.load(name, dtype=torch.float32), b.load(name, dtype=torch.float32)
        differ += int((x != y).sum())
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    result["cuda_vs_cpu"] = {"values_differing": differ, "max_abs_difference": worst}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
