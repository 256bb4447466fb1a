"""Benchmark ``loratool export`` on a Llama-shaped model with a rank-16 adapter: wall time and
peak RSS, one fresh process per export.

Presets: ``665m`` (hidden 1536, intermediate 4096, 20 layers) and ``1.5b`` (hidden 2048,
intermediate 5632, 28 layers: bench_merge.py's shapes); vocab 32000, bf16 on disk, fp32 ONNX.
``--stream`` exports with ``loratool export --stream`` (the graph traced without weights, the
weights written one tensor at a time); without it, the in-memory export.

Usage: python benchmarks/bench_export.py [--preset 665m|1.5b] [--stream] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import build_in_child  # the benchmarks' shared helpers (same folder)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--preset", choices=["665m", "1.5b"], default="665m")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or ROOT / "bench-work" / f"export-{args.preset}"
    layers = 20 if args.preset == "665m" else 28
    if args.build_only:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_merge

        llama = bench_merge.config

        def cfg(n: int) -> dict:  # hidden 1536, 20 layers: 665M parameters
            c = llama(n)
            c.update(hidden_size=1536, intermediate_size=4096, num_attention_heads=12,
                     num_key_value_heads=12, head_dim=128)
            return c

        if args.preset == "665m":
            bench_merge.config = cfg
        bench_merge.build(args.work, layers)
        return
    build_in_child(__file__, "--work", str(args.work), "--preset", args.preset)
    base, adapter = args.work / f"base-{layers}", args.work / f"adapter-{layers}"
    out = args.work / "onnx"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, "-m", "loratool",
                        "export", str(base), str(adapter), "-o", str(out), "--json"]
                       + (["--stream"] if args.stream else []), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    stdout = p.stdout
    peak = int(p.stderr.strip().splitlines()[-1].split()[1]) / 1024
    rep = json.loads(stdout)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"][
        "total_parameters"]
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"parameters {params / 1e6:.0f}M (bf16 on disk); export {wall:.1f} s wall, "
          f"{rep['seconds']:.1f} s in process; peak RSS {peak:.0f} MiB; ONNX folder "
          f"{size / 1e9:.2f} GB; max |ONNX − "
          f"PyTorch| {rep['verification']['max_abs_diff']:.3g} "
          f"({rep['verification'].get('mode', 'whole model')})")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
