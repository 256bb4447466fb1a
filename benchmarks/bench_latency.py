"""The LoRA paper's deployment claims, measured in onnxruntime: a merged adapter adds no latency
(merged graph = base graph), and what a hot-swappable graph (``export --adapters-as-inputs``)
costs, beside the unmerged PEFT model in PyTorch.

The model: Llama-shaped (hidden 1024, intermediate 2816, 8 layers, vocab 32000), fp32; the
adapter: rank 16 on all seven attention and MLP projections (PEFT, random factors). Exports
with loratool: the base, base + adapter merged, and the base with LoRA inputs plus the adapter
as an onnxruntime adapter file. Then, in one process, in rounds of shuffled order, a forward
pass over
one sequence of --tokens tokens (the prefill a serving stack runs), median of --repeat rounds:
  * onnxruntime: base graph; merged graph; swappable graph with the adapter active; swappable
    graph with no adapter
  * PyTorch: the PEFT model, unmerged; the merged model
Usage: python benchmarks/bench_latency.py [--tokens 128] [--repeat 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import build_in_child  # the benchmarks' shared helpers (same folder)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(work: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if (work / "adapter" / "adapter_config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(work / "base")
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                            init_lora_weights=False))
    peft.save_pretrained(work / "adapter")


def export(work: Path) -> None:
    lt = [sys.executable, "-m", "loratool", "-q", "export"]
    for name, extra in (("onnx-base", []), ("onnx-merged", [str(work / "adapter")]),
                        ("onnx-swap", [str(work / "adapter"), "--adapters-as-inputs"])):
        if not (work / name / "model.onnx").is_file():
            subprocess.run(lt + [str(work / "base"), *extra, "-o", str(work / name)],
                           check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "latency")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.work)
        export(args.work)
        return
    build_in_child(__file__, "--work", str(args.work))

    import numpy as np
    import onnxruntime as ort
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = {n: ort.InferenceSession(str(args.work / n / "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
            for n in ("onnx-base", "onnx-merged", "onnx-swap")}
    lora = ort.LoraAdapter()
    lora.Load(str(args.work / "onnx-swap" / "adapters" / "adapter.onnx_adapter"))
    active = ort.RunOptions()
    active.add_active_adapter(lora)
    base = LlamaForCausalLM.from_pretrained(args.work / "base").eval()
    peft = PeftModel.from_pretrained(base, args.work / "adapter").eval()
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(args.work / "base"),
                                       args.work / "adapter").merge_and_unload().eval()
    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def pt(model):  # type: ignore[no-untyped-def]
        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        return run

    cases = {
        "onnxruntime: base graph": lambda: sess["onnx-base"].run(None, feed),
        "onnxruntime: merged graph": lambda: sess["onnx-merged"].run(None, feed),
        "onnxruntime: swappable graph, adapter active":
            lambda: sess["onnx-swap"].run(None, feed, active),
        "onnxruntime: swappable graph, no adapter": lambda: sess["onnx-swap"].run(None, feed),
        "PyTorch: PEFT model, unmerged": pt(peft),
        "PyTorch: merged model": pt(merged),
    }
    a = sess["onnx-merged"].run(None, feed)[0]
    b = sess["onnx-swap"].run(None, feed, active)[0]
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):  # warm-up
        for f in cases.values():
            f()
    order = list(cases)
    rng = random.Random(0)
    for _ in range(args.repeat):
        rng.shuffle(order)  # a fixed order favours whichever runs first after PyTorch
        for k in order:
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["onnxruntime: base graph"])
    print(f"{args.tokens} tokens, {args.repeat} rounds, medians; merged vs swappable logits "
          f"differ by {float(np.abs(a - b).max()):.2g}")
    print("| run | ms per forward | µs per token | × base graph |")
    print("|---|---:|---:|---:|")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {k} | {med * 1e3:.1f} | {med * 1e6 / args.tokens:.0f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
