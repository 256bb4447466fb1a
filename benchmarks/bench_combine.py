"""Benchmark ``combine --method svd`` against PEFT's ``add_weighted_adapter(combination_type=
"svd")``: 4 adapters of rank 16 on a 4096 × 4096 and a 4096 × 11008 module, combined with
weights to rank 16. Reports wall time of the combination itself (both in one process, after
loading) and the relative error against the optimum: the best rank-16 approximation of the
exact weighted sum Σ wᵢ·sᵢ·Bᵢ·Aᵢ, from a dense float64 SVD.

Run with the peers' environment (it needs peft and transformers):
    bench-work/peers/bin/python benchmarks/bench_combine.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sq = torch.nn.Linear(4096, 4096, bias=False)
        self.up = torch.nn.Linear(4096, 11008, bias=False)


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from loratool.model.adapter import LoraModule
    from loratool.numerics.ops import factored_svd
    from loratool.verbs.combine import stacked

    torch.manual_seed(0)
    weights = [1.0, 0.5, -0.75, 0.25]
    model = get_peft_model(Net(), LoraConfig(r=16, lora_alpha=32, target_modules=["sq", "up"],
                                             init_lora_weights=False), adapter_name="a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=32, target_modules=["sq", "up"],
                                              init_lora_weights=False))
    rows = []
    for mod in ("sq", "up"):
        layer = getattr(model.base_model.model, mod)
        mods = [LoraModule(mod, layer.lora_A[f"a{i}"].weight.detach(),
                           layer.lora_B[f"a{i}"].weight.detach(), 32.0) for i in range(4)]
        exact = sum(w * m.delta(torch.float64) for m, w in zip(mods, weights))
        s = torch.linalg.svdvals(exact)
        optimum = float(s[16:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())

        def ours() -> torch.Tensor:
            B, A = stacked(list(zip(mods, weights)))
            U, S, Vh = factored_svd(B, A)
            r = S[:16].float().sqrt()
            return (U[:, :16] * r) @ (r[:, None] * Vh[:16])

        times_ours, times_peft = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            got = ours()
            times_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.add_weighted_adapter([f"a{i}" for i in range(4)], weights, "svd_out",
                                       combination_type="svd", svd_rank=16)
            times_peft.append(time.perf_counter() - t0)
            peft_delta = layer.get_delta_weight("svd_out").double()
            model.delete_adapter("svd_out")
        err_ours = float((got.double() - exact).norm() / exact.norm())
        err_peft = float((peft_delta - exact).norm() / exact.norm())
        rows.append((mod, tuple(exact.shape), statistics.median(times_ours),
                     statistics.median(times_peft), err_ours / optimum, err_peft / optimum,
                     optimum))
    print("| module | shape | loratool svd (s) | PEFT svd (s) | speed-up | loratool error / "
          "optimum | PEFT error / optimum |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mod, shape, to, tp, eo, ep, opt in rows:
        print(f"| {mod} | {shape[0]}×{shape[1]} | {to:.3f} | {tp:.2f} | {tp / to:.0f}× | "
              f"{eo:.4f} | {ep:.4f} |")
    print(f"\noptimum relative errors: {', '.join(f'{r[6]:.4f}' for r in rows)}")


if __name__ == "__main__":
    main()
