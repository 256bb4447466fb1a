"""The command line as a user meets it: entry points, --version, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import run_cli

from loratool import __version__


def test_version_and_help():
    res = run_cli("--version")
    assert res.rc == 0 and __version__ in res.out
    res = run_cli("--help")
    assert res.rc == 0 and "inspect" in res.out and "demo" in res.out
    res = run_cli("inspect", "--help")
    assert res.rc == 0 and "--against" in res.out and "Examples" in res.out


def test_python_dash_m(llama_dir):
    out = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(llama_dir), "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["kind"] == "model"


def test_demo_builds_loadable_models_and_reports(tmp_path):
    from transformers import AutoModelForCausalLM

    work = tmp_path / "demo"
    res = run_cli("demo", "--workdir", work)
    assert res.rc == 0, res.err
    assert "loratool inspect" in res.out and "--against" in res.out
    assert "7 changed" in res.out  # the attention and MLP matrices of layer 0
    base = AutoModelForCausalLM.from_pretrained(work / "base")
    tuned = AutoModelForCausalLM.from_pretrained(work / "tuned")
    assert base.dtype == torch.bfloat16
    ids = torch.tensor([[1, 7, 42, 99]])
    with torch.no_grad():
        lb, lt = base(ids).logits, tuned(ids).logits
    assert torch.isfinite(lb).all() and not torch.equal(lb, lt)
    # running it again replaces its own outputs
    assert run_cli("demo", "--workdir", work).rc == 0


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    res = run_cli("demo", "--workdir", tmp_path)
    assert res.rc == 1 and "not a loratool demo folder" in res.err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
