"""How soon each command says something, as a person meets it: in a pseudo-terminal.

Every command runs under a pty (stdout and stderr are terminals, so bars and the first status
line are drawn), on the demo's models; the time from start to the first visible character is
its first-line latency. The error cases (an output that exists, an adapter with full tensors
that a mode cannot take, flags that conflict) give the time to the one-line error, which should
come before torch is loaded: ``python -c "import torch"`` is timed beside them.

Also ``combine --method cat`` against what it must do: ``inspect`` both adapters and write the
output (``cp -r`` of both, then ``sync`` as cat flushes its output by default), on the demo's
small adapters and on two rank-64 adapters of a 1B Llama shape.

Usage: python benchmarks/bench_first_line.py [--repeat 5] [--loratool PATH]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")


def in_pty(argv: list[str]) -> tuple[float, float, int, tuple[str, str]]:
    """(seconds to the first visible character, seconds to exit, exit code, (first line,
    last line))."""
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal 100 columns wide, as a person's
        os.environ.update(COLUMNS="100", TERM="xterm")
        os.execvp(argv[0], argv)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    first = None
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
        if first is None and ANSI.sub(b"", out).strip():
            first = time.perf_counter() - t0
    _, status = os.waitpid(pid, 0)
    total = time.perf_counter() - t0
    os.close(fd)
    text = ANSI.sub(b"\n", out).decode(errors="replace")
    shown = [x.strip() for x in text.splitlines() if x.strip()]
    lines = (shown[0], shown[-1]) if shown else ("", "")
    return (first if first is not None else total), total, os.waitstatus_to_exitcode(status), lines


def full_tensor_adapter(adapter: Path, out: Path) -> Path:
    """The demo's adapter plus a modules_to_save copy of a norm (a full tensor)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    save_file(tensors, out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["norm"]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def big_adapter(out: Path, seed: int, layers: int = 16, hidden: int = 2048,
                inter: int = 5632, rank: int = 64) -> Path:
    """A Llama-shaped PEFT adapter (rank 64 on all seven projections of 16 layers, bf16):
    40M parameters, 81 MB, the size of a real one for a 1B model."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    tensors = {}
    for i in range(layers):
        for mod, (o, n) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{mod}"
            tensors[p + ".lora_A.weight"] = torch.randn(rank, n, generator=g).bfloat16()
            tensors[p + ".lora_B.weight"] = torch.randn(o, rank, generator=g).bfloat16()
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": [m.split(".")[1] for m in shapes]}))
    return out


def cat_times(lt: str, a: Path, b: Path, work: Path, repeat: int) -> dict[str, float]:
    """Median seconds of ``combine --method cat`` of a and b (durable, and --no-fsync) and of
    its floor: ``inspect`` of both, then ``cp -r`` of both (then ``sync``, for the durable
    one)."""
    runs: dict[str, list[float]] = {"cat": [], "floor": [], "cat --no-fsync": [],
                                    "floor, no flush": []}
    for _ in range(repeat):
        for name in runs:
            os.sync()
            t0 = time.perf_counter()
            if name.startswith("cat"):
                subprocess.run([lt, "-q", "combine", str(a), str(b), "--method", "cat", "-o",
                                str(work / "cat"), *name.split()[1:]], check=True,
                               stdout=subprocess.DEVNULL)
            else:
                for x in (a, b):
                    subprocess.run([lt, "-q", "inspect", str(x)], check=True,
                                   stdout=subprocess.DEVNULL)
                (work / "cat").mkdir()
                subprocess.run(["cp", "-r", str(a), str(b), str(work / "cat")], check=True)
                if name == "floor":  # each file flushed, as cat flushes what it writes
                    subprocess.run(["sync", *map(str, (work / "cat").rglob("*"))], check=True)
            runs[name].append(time.perf_counter() - t0)
            shutil.rmtree(work / "cat")
    return {k: statistics.median(v) for k, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--loratool", default=shutil.which("loratool") or "loratool")
    args = ap.parse_args()
    lt = args.loratool
    work = Path(tempfile.mkdtemp(prefix="bench-first-line-", dir="/tmp"))
    try:
        subprocess.run([lt, "-q", "demo", "--workdir", str(work / "d")], check=True,
                       stdout=subprocess.DEVNULL)
        d = work / "d"
        full = full_tensor_adapter(d / "adapter", work / "full-adapter")
        o = work / "o"
        runs: list[tuple[str, list[str], bool]] = [  # (name, arguments, removes -o after)
            ("inspect", ["inspect", f"{d}/base"], False),
            ("inspect --against", ["inspect", f"{d}/base", "--against", f"{d}/tuned"], False),
            ("extract", ["extract", f"{d}/base", f"{d}/tuned", "-o", str(o), "--rank", "8"], True),
            ("merge", ["merge", f"{d}/base", f"{d}/adapter", "-o", str(o)], True),
            ("unmerge", ["unmerge", f"{d}/merged", f"{d}/adapter", "-o", str(o)], True),
            ("combine --method cat", ["combine", f"{d}/adapter", f"{d}/extracted", "--method",
                                      "cat", "-o", str(o)], True),
            ("resize", ["resize", f"{d}/adapter", "--rank", "4", "-o", str(o)], True),
            ("convert", ["convert", f"{d}/adapter", "--to", "kohya", "-o",
                         f"{o}.safetensors"], True),
            ("analyze", ["analyze", f"{d}/base", f"{d}/tuned"], False),
            ("export", ["export", f"{d}/base", f"{d}/adapter", "-o", str(o)], True),
            # errors that need no tensor: before torch loads
            ("error: merge output exists", ["merge", f"{d}/base", f"{d}/adapter", "-o",
                                            f"{d}/merged"], False),
            ("error: extract output exists", ["extract", f"{d}/base", f"{d}/tuned", "-o",
                                              f"{d}/extracted"], False),
            ("error: export full tensors", ["export", f"{d}/base", str(full), "-o", str(o),
                                            "--adapters-as-inputs"], False),
            ("error: convert full tensors", ["convert", str(full), "--to", "kohya", "-o",
                                             f"{o}.safetensors"], False),
            ("error: merge --quant non-GGUF", ["merge", f"{d}/base", f"{d}/adapter", "-o",
                                               str(o), "--quant", "Q8_0"], False),
        ]
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
        lines: dict[str, tuple[str, str]] = {}
        torch_import: list[float] = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            torch_import.append(time.perf_counter() - t0)
            for name, argv, clean in runs:
                first, total, rc, shown = in_pty([lt, *argv])
                timings[name].append((first, total))
                # the work folder's name, also where a status line cut it short
                short = [re.sub(r"/tmp/bench[-\w]*…?", "…", x) for x in shown]
                lines[name] = (short[0][:60], f"rc={rc}: " + short[1][:70])
                if clean:
                    for p in (o, Path(f"{o}.safetensors")):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(
                            missing_ok=True)
        med = statistics.median
        print(f"median of {args.repeat} runs each, in a pseudo-terminal; "
              f"`python -c 'import torch'`: {med(torch_import):.2f} s\n")
        print("| command | first line (s) | whole run (s) | first line | last line |")
        print("|---|---:|---:|---|---|")
        for name, _, _ in runs:
            f = med(t[0] for t in timings[name])
            w = med(t[1] for t in timings[name])
            first, last = lines[name]
            print(f"| {name} | {f:.2f} | {w:.2f} | `{first}` | `{last}` |")
        print("\n| combine --method cat of | cat (s) | inspect both + cp -r both + sync (s) "
              "| ratio | cat --no-fsync (s) | inspect both + cp -r both (s) | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        big = [big_adapter(work / f"big-{i}", i) for i in (1, 2)]
        for what, (a, b) in (("the demo's two adapters (0.3 MB each)",
                              (d / "adapter", d / "extracted")),
                             ("two rank-64 adapters of a 1B Llama shape (81 MB each)", big)):
            t = cat_times(lt, a, b, work, args.repeat)
            print(f"| {what} | {t['cat']:.2f} | {t['floor']:.2f} | "
                  f"{t['cat'] / t['floor']:.2f} | {t['cat --no-fsync']:.2f} | "
                  f"{t['floor, no flush']:.2f} | "
                  f"{t['cat --no-fsync'] / t['floor, no flush']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
