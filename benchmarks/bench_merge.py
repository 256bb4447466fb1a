"""Benchmark ``loratool merge`` side by side with the I/O floor and the peer tools.

In one run, alternating, each a fresh process, on synthetic Llama-shaped bf16 pairs (base +
rank-16 PEFT adapter on every attention and MLP matrix):
  * ``cp -r BASE OUT && sync OUT/*``                     the floor, as durable as a merge
  * ``cp -r BASE OUT``                                   the floor without the flush
  * ``python -c "import torch"``                         interpreter start-up with torch
  * ``loratool merge BASE ADAPTER -o OUT``               (fsync'd before it is published)
  * ``loratool merge BASE ADAPTER -o OUT --no-fsync``
  * ``loratool merge BASE ADAPTER -o OUT --no-exact-record`` (no record of the values unmerge
    cannot recompute)
  * PEFT: ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``
  * mergekit: ``mergekit-yaml`` with the ``BASE+ADAPTER`` model syntax (passthrough)
Every case starts after a ``sync``, so that no case pays for the previous one's dirty pages.
Reports median wall time and peak RSS (``wait4``) per tool and model size.

``--busy``: the default merge alone, alternating idle runs with runs beside a competing busy
process (``yes > /dev/null``, one core), median and worst of each.

The peers run from a separate virtual environment (``--peers-python``) so that their pinned
dependencies do not touch loratool's:
    python3 -m venv bench-work/peers && bench-work/peers/bin/pip install torch==2.13.0 \\
        mergekit==0.1.5 peft
``--also TREE``: the merge of another checkout of loratool (e.g. a worktree of an older
commit) in the same alternation, to compare two versions on one machine in one run.
Usage: python benchmarks/bench_merge.py [--layers 8 20] [--repeat 3] [--busy] [--also TREE]
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

ROOT = Path(__file__).resolve().parents[1]

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out)
"""


# runs ``loratool`` from the checkout in argv[1], not the installed one
RUN_TREE = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in repr(f)]
sys.path.insert(0, sys.argv.pop(1))
sys.argv[0] = "loratool"
runpy.run_module("loratool", run_name="__main__")
"""


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 32000,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "dtype": "bfloat16", "rope_theta": 10000.0}


def build(work: Path, layers: int, rank: int = 16) -> tuple[Path, Path]:
    """Base model (bf16, 5GB shards as transformers writes them) and a PEFT adapter."""
    import torch

    sys.path.insert(0, str(ROOT))
    from loratool.formats import peft
    from loratool.io.writer import CheckpointWriter
    from loratool.model.adapter import LoraAdapter, LoraModule
    from loratool.verbs.demo import llama_shapes

    base, adapter = work / f"base-{layers}", work / f"adapter-{layers}"
    if (adapter / "adapter_config.json").exists():
        return base, adapter
    cfg = config(layers)
    g = torch.Generator().manual_seed(0)
    ad = LoraAdapter(base_model=str(base), task_type="CAUSAL_LM")
    with CheckpointWriter(base, force=True, max_shard_size="1GB") as w:
        w.add_file("config.json", json.dumps(cfg, indent=2))
        for name, shape in llama_shapes(cfg):
            t = torch.randn(shape, generator=g) * 0.02 if len(shape) == 2 else torch.ones(shape)
            w.add(name, t.to(torch.bfloat16))
            if len(shape) == 2 and ".layers." in name:
                a = torch.randn(rank, shape[1], generator=g) * 0.01
                b = torch.randn(shape[0], rank, generator=g) * 0.01
                ad.add(LoraModule(name.removesuffix(".weight"), a.to(torch.bfloat16),
                                  b.to(torch.bfloat16), float(rank)))
    peft.write(ad, adapter, force=True)
    return base, adapter


def build_in_child(script: str, *args: str) -> None:
    """Build the inputs in a child process: a parent holding torch would inflate every later
    child's peak RSS (fork copies the parent's resident pages before exec)."""
    subprocess.run([sys.executable, script, "--build-only", *args], check=True)


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def cases(args: argparse.Namespace, n: int, peers: Path) -> dict[str, list[str]]:
    base, adapter, out = args.work / f"base-{n}", args.work / f"adapter-{n}", args.work / "out"
    yml = args.work / f"mergekit-{n}.yml"
    yml.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n"
                   "dtype: bfloat16\n")
    merge = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out)]
    c = {
        "cp -r + sync (floor)": ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/* "$1"', str(base),
                                 str(out)],
        "python -c 'import torch' (start-up)": [sys.executable, "-c", "import torch"],
        "loratool merge": merge,
        "cp -r (floor, no flush)": ["cp", "-r", str(base), str(out)],
        "loratool merge --no-fsync": merge + ["--no-fsync"],
        # the record of the values unmerge cannot recompute exactly (on by default) left out
        "loratool merge --no-exact-record": merge + ["--no-exact-record"],
        "PEFT merge_and_unload": [str(peers), "-c", PEFT_MERGE, str(base), str(adapter),
                                  str(out)],
        "mergekit-yaml (base+lora)": [str(peers.parent / "mergekit-yaml"), str(yml), str(out),
                                      "--lazy-unpickle", "--allow-crimes",
                                      "--lora-merge-cache", str(args.work / "mk-cache")],
    }
    if not peers.exists():
        c = {k: v for k, v in c.items() if not k.startswith(("PEFT", "mergekit"))}
    for tree in args.also:  # another checkout of loratool, side by side with this one
        c[f"loratool merge ({Path(tree).name})"] = [sys.executable, "-c", RUN_TREE, tree,
                                                    *merge[3:]]
    return c


def fresh(args: argparse.Namespace) -> None:
    """No output left, no cache left, nothing dirty: each case starts from the same state."""
    shutil.rmtree(args.work / "out", ignore_errors=True)
    shutil.rmtree(args.work / "mk-cache", ignore_errors=True)
    os.sync()


def busy(args: argparse.Namespace, env: dict) -> None:
    """The default merge, idle and beside `yes > /dev/null`, alternating."""
    n = args.layers[-1]
    cmd = cases(args, n, Path("/nonexistent"))["loratool merge"]
    walls: dict[str, list[float]] = {"idle": [], "busy": []}
    for _ in range(args.repeat):
        for kind in walls:
            fresh(args)
            hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if kind == "busy" \
                else None
            try:
                walls[kind].append(run(cmd, env)[0])
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    fresh(args)
    print(f"{n} layers, {args.repeat} runs each, alternating\n")
    print("| load | median wall (s) | worst (s) | runs |\n|---|---:|---:|---|")
    for kind, ws in walls.items():
        print(f"| {kind} | {statistics.median(ws):.2f} | {max(ws):.2f} | "
              f"{', '.join(f'{w:.2f}' for w in ws)} |")
    ratio = statistics.median(walls["busy"]) / statistics.median(walls["idle"])
    print(f"busy / idle median: {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "merge")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 20])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--busy", action="store_true",
                    help="the default merge idle and beside a busy process, nothing else")
    ap.add_argument("--peers-python", default=str(ROOT / "bench-work" / "peers" / "bin" /
                                                 "python"))
    ap.add_argument("--also", nargs="*", default=[], metavar="TREE",
                    help="other checkouts of loratool whose merge runs beside this one's")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        for n in args.layers:
            build(args.work, n)
        return
    # build in a child: a parent holding torch would inflate the children's peak RSS
    build_in_child(__file__, "--work", str(args.work), "--layers", *map(str, args.layers))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.busy:
        return busy(args, env)
    rows = []
    for n in args.layers:
        size = sum(f.stat().st_size for f in (args.work / f"base-{n}").glob("*.safetensors"))
        todo = cases(args, n, Path(args.peers_python))
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in todo}
        for _ in range(args.repeat):
            for name, cmd in todo.items():
                fresh(args)
                results[name].append(run(cmd, env))
        fresh(args)
        med = {k: statistics.median(w for w, _ in rs) for k, rs in results.items()}
        for name, rs in results.items():
            rows.append((n, size, name, med[name], max(m for _, m in rs)))
        start = med["python -c 'import torch' (start-up)"]
        for floor, lt in (("cp -r + sync (floor)", "loratool merge"),
                          ("cp -r (floor, no flush)", "loratool merge --no-fsync")):
            print(f"{n} layers: {lt} / ({floor} + start-up) = "
                  f"{med[lt] / (med[floor] + start):.2f}")
        for name in med:
            if name.startswith(("PEFT", "mergekit")):
                print(f"{n} layers: loratool merge is {med[name] / med['loratool merge']:.2f}× "
                      f"faster than {name}")
    print(f"\n{args.repeat} runs each, alternating; median wall, max peak RSS\n")
    print("| layers | base size | command | wall (s) | peak RSS (MiB) |")
    print("|---:|---:|---|---:|---:|")
    for n, size, name, wall, rss in rows:
        print(f"| {n} | {size / 1e9:.2f} GB | {name} | {wall:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
