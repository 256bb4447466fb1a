"""Extract throughput on CUDA against the CPU, in one go, on a machine with a GPU.

Builds the "7B-layers" pair of bench_extract.py (hidden 4096, intermediate 11008, 2 layers,
bf16) and runs ``loratool extract --rank 16`` with ``--device cuda`` and ``--device cpu``,
printing one JSON object: wall times, peak memory, and the largest per-module error of each.

Usage (repository root, loratool installed): python benchmarks/gpu_extract.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_extract import build  # noqa: E402


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    work = Path("/tmp/loratool-gpu-extract")
    base, tuned = build(work, "7B-layers")
    result: dict = {"gpu": torch.cuda.get_device_name(0)}
    for dev in ("cuda", "cpu"):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "loratool", "extract", str(base), str(tuned),
                              "-o", str(work / f"out-{dev}"), "--rank", "16", "--device", dev,
                              "--force", "--json"], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr)
        rep = json.loads(res.stdout)
        result[dev] = {"process_seconds": time.perf_counter() - t0, "seconds": rep["seconds"],
                       "max_rel_error": rep["totals"]["max_rel_error"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
