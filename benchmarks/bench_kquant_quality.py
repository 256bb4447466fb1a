"""How close a merge into a Q4_K_M model (or ``--type IQ4_XS`` …) stays to the exact merge,
measured in llama.cpp itself: loratool (changed tensors re-quantized to their own Q4_K/Q6_K,
the file the base's size) beside ``llama-export-lora`` (changed tensors written as F16), with
and without an importance matrix.

The model: a Llama (hidden 512, intermediate 1536, 4 layers, a 128-token SentencePiece
vocabulary) with transformers' initialisation, its head scaled so that next-token distributions are
peaked as a trained model's are, a PEFT LoRA adapter of rank 16 on every projection whose ΔW
is 10 % of each weight. llama.cpp's converter writes the F32 GGUF, ``llama-quantize`` the
Q4_K_M (or ``--type``) one (and with ``llama-imatrix``'s matrix, the imatrix one).
The exact merge is loratool's merge into the F32 GGUF (bit for bit the safetensors merge,
tested). Every candidate runs through ``llama-perplexity --kl-divergence`` against the exact
merge's logits on the same text: mean KL divergence and how often the top token agrees.

Usage: python benchmarks/bench_kquant_quality.py --llama-bin PATH/TO/llama.cpp/build/bin
       [--type Q4_K_M|IQ4_XS|IQ4_NL|Q5_K_M|…]  (the llama-quantize type of the base)
(the folder with llama-quantize, llama-export-lora, llama-perplexity, llama-imatrix; they come
from the llama-cpp-python 0.3.36 source: ``cmake -B build && cmake --build build --target
llama-quantize llama-export-lora llama-perplexity llama-imatrix``)
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = Path(os.environ.get("LORATOOL_LLAMA_CPP", ROOT / ".ci-llamacpp"))


def sh(*cmd: object, **kw: object) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def build(work: Path, bins: Path, qtype: str) -> dict[str, Path]:
    """The models and the adapter; returns the paths by name."""
    import torch
    import transformers as T
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import sentencepiece_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1536,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=512)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions, as a trained model's are
        model.lm_head.weight.mul_(40)
    model.save_pretrained(work / "base")
    sentencepiece_tokenizer(work / "base")
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=16, lora_alpha=16, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    with torch.no_grad():  # each ΔW 10 % of its W (Frobenius)
        for mod in pm.modules():
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_B", {}):
                ratio = mod.get_delta_weight("default").norm() / mod.base_layer.weight.norm()
                mod.lora_B["default"].weight.mul_(0.1 / ratio)
    pm.save_pretrained(work / "adapter")
    text = work / "text.txt"
    text.write_text(" ".join(f"the {a} and the {b} are {c}" for _ in range(12) for a in
                             "cat dog bird fish tree".split() for b in
                             "red blue green sky sea".split() for c in
                             "here there now then".split()))
    f32 = work / "f32.gguf"
    sh(sys.executable, LLAMA_CPP / "convert_hf_to_gguf.py", work / "base", "--outfile", f32,
       "--outtype", "f32")
    lt = [sys.executable, "-m", "loratool"]
    sh(*lt, "convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o",
       work / "adapter.gguf", "--force")
    sh(bins / "llama-quantize", f32, work / f"{qtype}.gguf", qtype)
    sh(bins / "llama-imatrix", "-m", f32, "-f", text, "-o", work / "imatrix.gguf", "-c", "128",
       "--chunks", "8")
    sh(bins / "llama-quantize", "--imatrix", work / "imatrix.gguf", f32,
       work / f"{qtype}-im.gguf", qtype)
    return {"f32": f32, "base": work / f"{qtype}.gguf", "base-im": work / f"{qtype}-im.gguf",
            "adapter": work / "adapter", "adapter.gguf": work / "adapter.gguf", "text": text,
            "imatrix": work / "imatrix.gguf"}


def kld(bins: Path, model: Path, base_logits: Path, text: Path) -> tuple[float, float]:
    """Mean KL divergence from the exact merge's logits, and the top-token agreement (%)."""
    out = sh(bins / "llama-perplexity", "-m", model, "-f", text, "-c", "128",
             "--kl-divergence-base", base_logits, "--kl-divergence", "-t", "2")
    # the last chunk's row holds the running means: PPL, ln(PPL(Q)/PPL(base)), KLD, Δp RMS,
    # same top p, each "value ± error"
    rows = [r for r in out.splitlines() if re.match(r"\s*\d+\s+[\d.]+\s+±", r)]
    if not rows:
        raise SystemExit(out[-3000:])
    values = re.findall(r"([-\d.]+)\s+±", rows[-1])
    return float(values[2]), float(values[4])


def same_as_llama_quantize(bins: Path, ours: Path, base: Path, adapter: Path,
                           imatrix: Path | None, work: Path, qtype: str) -> str:
    """Whether loratool's re-quantized tensors are llama-quantize's: the same merged float32
    weights (deq(W) + ΔW, written as F32 by ``merge --quant F32``) quantized by llama-quantize
    to the base's type (with the same imatrix), compared tensor by tensor."""
    import gguf

    f32, lq = work / "check-f32.gguf", work / "check-lq.gguf"
    sh(sys.executable, "-m", "loratool", "merge", base, adapter, "-o", f32, "--quant", "F32",
       "--force")
    sh(bins / "llama-quantize", "--allow-requantize",
       *(["--imatrix", imatrix] if imatrix else []), f32, lq, qtype)

    def tensors(path: Path) -> dict:
        return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    a, b = tensors(ours), tensors(lq)
    changed = [n for n, t in tensors(f32).items()
               if t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 2]
    same = sum(a[n].tensor_type == b[n].tensor_type and bytes(a[n].data) == bytes(b[n].data)
               for n in changed)
    return (f"{ours.name}: {same} of {len(changed)} changed tensors byte for byte what "
            f"llama-quantize{' --imatrix' if imatrix else ''} writes for the same merged weights")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "kquant-quality")
    ap.add_argument("--type", default="Q4_K_M", help="the base's llama-quantize type")
    args = ap.parse_args()
    bins, work, q = args.llama_bin, args.work, args.type
    p = build(work, bins, q)
    lt = [sys.executable, "-m", "loratool"]
    exact = work / "exact.gguf"
    sh(*lt, "merge", p["f32"], p["adapter"], "-o", exact, "--force")
    logits = work / "exact.kld"
    sh(bins / "llama-perplexity", "-m", exact, "-f", p["text"], "-c", "128",
       "--kl-divergence-base", logits, "-t", "2")
    cands = {
        f"{q} base, adapter not merged": p["base"],
        f"changed tensors in F32 (the floor: unchanged ones {q})": work / "lt-f32.gguf",
        f"loratool merge ({q} kept)": work / "lt.gguf",
        "loratool merge --quant Q8_0": work / "lt-q8.gguf",
        "llama-export-lora (changed → F16)": work / "el.gguf",
        f"imatrix {q} base, not merged": p["base-im"],
        "loratool merge --imatrix": work / "lt-im.gguf",
        "loratool merge, imatrix base, no --imatrix": work / "lt-noim.gguf",
        "llama-export-lora, imatrix base": work / "el-im.gguf",
    }
    sh(*lt, "merge", p["base"], p["adapter"], "-o", cands[f"loratool merge ({q} kept)"],
       "--force")
    sh(*lt, "merge", p["base"], p["adapter"], "-o", cands["loratool merge --quant Q8_0"],
       "--quant", "Q8_0", "--force")
    floor = cands[f"changed tensors in F32 (the floor: unchanged ones {q})"]
    sh(*lt, "merge", p["base"], p["adapter"], "-o", floor, "--quant", "F32", "--force")
    sh(bins / "llama-export-lora", "-m", p["base"], "--lora", p["adapter.gguf"], "-o",
       cands["llama-export-lora (changed → F16)"])
    sh(*lt, "merge", p["base-im"], p["adapter"], "-o", cands["loratool merge --imatrix"],
       "--imatrix", p["imatrix"], "--force")
    sh(*lt, "merge", p["base-im"], p["adapter"], "-o",
       cands["loratool merge, imatrix base, no --imatrix"], "--force")
    sh(bins / "llama-export-lora", "-m", p["base-im"], "--lora", p["adapter.gguf"], "-o",
       cands["llama-export-lora, imatrix base"])
    print(f"exact merge: {exact.name} (F32, {exact.stat().st_size / 2**20:.1f} MiB)")
    for ours, base, im in ((cands[f"loratool merge ({q} kept)"], p["base"], None),
                           (cands["loratool merge --imatrix"], p["base-im"], p["imatrix"])):
        print(same_as_llama_quantize(bins, ours, base, p["adapter"], im, work, q))
    print()
    print("| model | file (MiB) | mean KLD vs exact merge | same top token |")
    print("|---|---:|---:|---:|")
    for name, path in cands.items():
        d, same = kld(bins, path, logits, p["text"])
        print(f"| {name} | {path.stat().st_size / 2**20:.2f} | {d:.6f} | {same:.2f} % |",
              flush=True)


if __name__ == "__main__":
    main()
