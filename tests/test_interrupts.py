"""Ctrl-C at random moments, as a person presses it: during start-up and imports, reading,
merging, writing, verifying and publishing. Every run ends with exit 130 (or 0 when it had
finished), one line and no traceback, nothing temporary left beside the output, and the old
output kept whole unless the interrupt came after the new one was in place (and it says so).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import gguf_model, run_cli, tree
from test_pipeline import sdxl  # noqa: F401  (the fixture: a tiny SDXL pipeline and a LoRA)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("ctrl-c")
    build_pair(d)
    gguf_model(d / "base", d / "base.gguf")
    return d


def _interrupt_at_random(args: list[object], out: Path, seed: int, runs: int, longest: float
                         ) -> None:
    """``runs`` runs of ``loratool ARGS --force`` over an existing ``out``, each sent SIGINT
    after a random delay of up to ``longest`` seconds."""
    assert run_cli(*args).rc == 0  # the old output
    before = tree(out) if out.is_dir() else {"": out.read_bytes()}
    rng = random.Random(seed)
    for _ in range(runs):
        p = subprocess.Popen([sys.executable, "-m", "loratool", *map(str, args), "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.02, longest))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, 130), err  # 0 only when it finished before the signal
        assert "Traceback" not in err and "internal error" not in err, err
        leftovers = [n.name for n in out.parent.iterdir() if n.name.startswith(f".{out.name}.")]
        assert not leftovers, (err, leftovers)
        if p.returncode == 130:
            assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
            if "that output is complete" not in err:  # the old output, exactly
                now = tree(out) if out.is_dir() else {"": out.read_bytes()}
                assert now == before, err
                assert "was kept as it was" in err, err
        assert out.exists()


def test_convert(demo, tmp_path):
    out = tmp_path / "k.safetensors"
    _interrupt_at_random(["convert", demo / "adapter", "--to", "kohya", "-o", out], out,
                         seed=1, runs=6, longest=1.5)


def test_merge(demo, tmp_path):
    out = tmp_path / "m"
    _interrupt_at_random(["merge", demo / "base", demo / "adapter", "-o", out, "--verify"],
                         out, seed=2, runs=6, longest=2.5)


def test_merge_into_gguf(demo, tmp_path):
    out = tmp_path / "m.gguf"
    _interrupt_at_random(["merge", demo / "base.gguf", demo / "adapter", "-o", out,
                          "--verify"], out, seed=3, runs=6, longest=2.5)


def test_merge_a_pipeline(sdxl, tmp_path):  # noqa: F811
    folder, lora = sdxl
    out = tmp_path / "p"
    _interrupt_at_random(["merge", folder, next(lora.glob("*.safetensors")), "-o", out,
                          "--verify"], out, seed=4, runs=6, longest=3.0)


def test_export(demo, tmp_path):
    out = tmp_path / "onnx"
    _interrupt_at_random(["export", demo / "base", demo / "adapter", "-o", out, "--stream"],
                         out, seed=5, runs=4, longest=8.0)


def test_an_interrupt_while_publishing_waits_and_says_so(demo, tmp_path, monkeypatch):
    """An interrupt that lands while the output is renamed into place waits for the rename
    and the clean-up; the run then says the new output is complete."""
    import loratool.io.staging as staging

    out = tmp_path / "m"
    assert run_cli("merge", demo / "base", demo / "adapter", "-o", out).rc == 0
    swap = staging._swap

    def interrupted_swap(*a: object, **k: object) -> None:
        signal.raise_signal(signal.SIGINT)  # lands inside the held section
        swap(*a, **k)

    monkeypatch.setattr(staging, "_swap", interrupted_swap)
    res = run_cli("merge", demo / "base", demo / "adapter", "-o", out, "--force")
    assert res.rc == 130 and "that output is complete" in res.err, res.err
    assert not [n for n in tmp_path.iterdir() if n.name.startswith(".m.")]
    assert (out / "model.safetensors").is_file()
