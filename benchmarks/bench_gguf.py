"""Benchmark ``loratool merge`` into a quantized GGUF model, beside the I/O floor and
llama.cpp's own ``llama-export-lora``.

The model: the 7B-shaped layers of bench_extract.py (hidden 4096, intermediate 11008, 2
layers, vocab 32000) as a llama.cpp GGUF file in Q8_0 (norms F32), written with the gguf
package; the adapter: rank 16 on every attention and MLP matrix, as a GGUF LoRA adapter.
Commands, each a fresh process, alternating:
  * ``cp MODEL OUT``                                        the I/O floor
  * ``python -c "import torch, loratool.verbs.merge_gguf"``  start-up: time and memory
                                                            before anything is read
  * ``loratool merge MODEL ADAPTER -o OUT.gguf``            re-quantized to Q8_0
  * ``loratool merge MODEL ADAPTER -o OUT.gguf --quant F16`` changed tensors as F16
  * ``llama-export-lora -m MODEL --lora ADAPTER -o OUT``    (with --export-lora PATH; it
    writes changed tensors as F16, it cannot re-quantize)
Reports median wall time and peak RSS.

llama-export-lora comes from the llama-cpp-python source on PyPI:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf …
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF \\
        && cmake --build build --target llama-export-lora -j2
With ``--base-type Q4_K_M --llama-quantize PATH`` the same layers are written in F16 and
made Q4_K_M by llama.cpp's own ``llama-quantize`` (Q4_K, with Q6_K where llama.cpp puts it), and
loratool's merge re-quantizes each changed tensor in its own K-quant type (``--targets qv``:
the adapter on q_proj and v_proj only, the common case, instead of all seven matrices).

Usage: python benchmarks/bench_gguf.py [--repeat 3] [--export-lora PATH]
       [--base-type Q4_K_M --llama-quantize PATH] [--targets all|qv]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_extract import PAIRS  # noqa: E402
from bench_merge import build_in_child, run  # noqa: E402


def build(work: Path, rank: int = 16, base_type: str = "Q8_0", targets: str = "all",
          quantizer: Path | None = None) -> tuple[Path, Path]:
    """The GGUF model (Q8_0 from the gguf package, or Q4_K_M from llama-quantize) and a GGUF
    LoRA adapter for it (llama.cpp's names)."""
    import gguf
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from loratool.formats import gguf as gguf_format
    from loratool.formats.gguf_names import Arch
    from loratool.model.adapter import LoraAdapter, LoraModule
    from loratool.verbs.demo import llama_shapes

    model, adapter = work / f"model-{base_type}.gguf", work / f"adapter-{targets}.gguf"
    if model.exists() and adapter.exists():
        return model, adapter
    written = model if base_type == "Q8_0" else work / "model-F16.gguf"
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "vocab_size": 32000, **PAIRS["7B-layers"]}
    arch = Arch.of_config(cfg)
    tmap = arch.tensor_map()
    g = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(str(written), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_context_length(2048)
    w.add_layer_norm_rms_eps(1e-5)  # llama.cpp's loader (llama-quantize) requires it
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if base_type == "Q8_0"
                    else gguf.LlamaFileType.MOSTLY_F16)
    ad = LoraAdapter(source_format="gguf", naming="gguf",
                     metadata={"general.architecture": "llama"})
    q8 = gguf.GGMLQuantizationType.Q8_0
    for hf, shape in llama_shapes({**cfg, "tie_word_embeddings": False}):
        name = tmap.get_name(hf, try_suffixes=(".weight",))
        t = torch.randn(shape, generator=g) * 0.02 if len(shape) == 2 else torch.ones(shape)
        if len(shape) == 2 and base_type == "Q8_0":
            w.add_tensor(name, gguf.quants.quantize(t.numpy(), q8), raw_dtype=q8)
        elif len(shape) == 2:
            w.add_tensor(name, t.numpy().astype(np.float16))
        else:
            w.add_tensor(name, t.numpy().astype(np.float32))
        adapted = targets == "all" or hf.endswith(("q_proj.weight", "v_proj.weight"))
        if len(shape) == 2 and ".layers." in hf and adapted:
            a = torch.randn(rank, shape[1], generator=g) * 0.01
            b = torch.randn(shape[0], rank, generator=g) * 0.01
            ad.add(LoraModule(name.removesuffix(".weight"), a, b, float(rank)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if written != model:
        assert quantizer is not None, "--base-type Q4_K_M needs --llama-quantize"
        subprocess.run([str(quantizer), str(written), str(model), base_type], check=True,
                       capture_output=True)
        written.unlink()
    gguf_format.write(ad, adapter, force=True)
    return model, adapter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "gguf")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--export-lora", type=Path, default=None)
    ap.add_argument("--base-type", choices=["Q8_0", "Q4_K_M"], default="Q8_0")
    ap.add_argument("--targets", choices=["all", "qv"], default="all")
    ap.add_argument("--llama-quantize", type=Path, default=None)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(args.work, base_type=args.base_type, targets=args.targets,
              quantizer=args.llama_quantize)
        return
    extra = ["--base-type", args.base_type, "--targets", args.targets]
    if args.llama_quantize:
        extra += ["--llama-quantize", str(args.llama_quantize)]
    build_in_child(__file__, "--work", str(args.work), *extra)
    model = args.work / f"model-{args.base_type}.gguf"
    adapter = args.work / f"adapter-{args.targets}.gguf"
    out = args.work / "out.gguf"
    py = sys.executable
    cmds = {"cp (I/O floor)": ["cp", str(model), str(out)],
            # what Python, torch and the merge's modules hold before a merge reads anything:
            # the floor of any loratool run's time and memory
            "python -c 'import torch, loratool…' (start-up)": [
                py, "-c", "import torch, loratool.verbs.merge_gguf"],
            f"loratool merge ({args.base_type} kept)": [py, "-m", "loratool", "merge",
                                                       str(model), str(adapter), "-o",
                                                       str(out), "--device", "cpu"],
            "loratool merge --quant F16": [py, "-m", "loratool", "merge", str(model),
                                           str(adapter), "-o", str(out), "--quant", "F16",
                                           "--device", "cpu"]}
    if args.export_lora:
        cmds["llama-export-lora (F16 out)"] = [str(args.export_lora), "-m", str(model),
                                               "--lora", str(adapter), "-o", str(out), "-t",
                                               "2"]
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    sizes: dict[str, int] = {}
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            out.unlink(missing_ok=True)
            res[name].append(run(cmd))
            sizes[name] = out.stat().st_size if out.exists() else 0
    ref = statistics.median(w for w, _ in res["cp (I/O floor)"])
    print(f"model {model.stat().st_size / 2**20:.0f} MiB ({args.base_type}), adapter "
          f"{adapter.stat().st_size / 2**20:.0f} MiB; {args.repeat} run(s) each, alternating\n")
    print("| command | median wall (s) | vs cp | peak RSS (MiB) | output (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name in cmds:
        wall = statistics.median(w for w, _ in res[name])
        rss = max(m for _, m in res[name])
        size = f"{sizes[name] / 2**20:.0f}" if sizes[name] else "–"
        print(f"| {name} | {wall:.2f} | {wall / ref:.1f}× | {rss:.0f} | {size} |", flush=True)
    out.unlink(missing_ok=True)
    shutil.rmtree(args.work / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
