"""Benchmark ``loratool analyze`` against ``loratool extract`` on the same pair.

The analysis reads both models and computes, per changed matrix, the leading singular values
(as many as the largest --energy needs), ‖ΔW‖², the error curve and the amplification factor;
extract reads both models, computes a truncated SVD and writes the factors. The claim checked:
the analysis costs no more than the extraction it advises.

Pairs are those of bench_extract.py (synthetic bf16 Llama shapes, a rank-16 change plus noise
on every attention and MLP matrix). Commands, each a fresh process, alternating:
  * ``loratool extract BASE TUNED -o OUT --rank 16``
  * ``loratool extract BASE TUNED -o OUT --energy 0.9``
  * ``loratool analyze BASE TUNED --json``   (energies 0.5/0.9/0.99, amplification)
Reports median wall time and peak RSS.

Usage: python benchmarks/bench_analyze.py [--pairs 7B-layers] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_extract import PAIRS  # noqa: E402
from bench_merge import build_in_child, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "extract")
    ap.add_argument("--pairs", nargs="+", default=["7B-layers"], choices=list(PAIRS))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    # build in a child (bench_extract's builder): torch in this process is not measured
    build_in_child(str(ROOT / "benchmarks" / "bench_extract.py"), "--work", str(args.work),
                   "--pairs", *args.pairs)
    py, out = sys.executable, args.work / "out-analyze-bench"
    print(f"{args.repeat} run(s) each, alternating; median wall, max peak RSS\n")
    print("| pair | command | wall (s) | peak RSS (MiB) | wall / extract --rank 16 |")
    print("|---|---|---:|---:|---:|")
    for pair in args.pairs:
        base, tuned = str(args.work / f"{pair}-base"), str(args.work / f"{pair}-tuned")
        cmds = {
            "extract --rank 16": [py, "-m", "loratool", "extract", base, tuned, "-o", str(out),
                                  "--rank", "16", "--device", "cpu"],
            "extract --energy 0.9": [py, "-m", "loratool", "extract", base, tuned, "-o",
                                     str(out), "--energy", "0.9", "--device", "cpu"],
            "analyze": [py, "-m", "loratool", "analyze", base, tuned, "--json", "--device",
                        "cpu"],
        }
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                shutil.rmtree(out, ignore_errors=True)
                res[name].append(run(cmd))
        ref = statistics.median(w for w, _ in res["extract --rank 16"])
        for name in cmds:
            wall = statistics.median(w for w, _ in res[name])
            rss = max(m for _, m in res[name])
            print(f"| {pair} | `{name}` | {wall:.2f} | {rss:.0f} | {wall / ref:.2f} |",
                  flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
