"""Feedback from the first second: every command says what it is about to do before it loads
torch (in a terminal), and every check that needs no tensor refuses before torch is imported,
with the same message the verb gives when called from Python.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, finetuned
from test_terminal import run_in_terminal

import loratool

# runs the command line, then says on stderr whether torch was ever imported
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: sys.stderr.write('\\ntorch loaded: %s\\n'"
         " % ('torch' in sys.modules)))\n"
         "from loratool.cli import main\n"
         "main(sys.argv[1:])\n")


def probe(*args: object) -> tuple[int, str, bool]:
    """(exit code, the error line, whether torch was loaded) of ``loratool ARGS``."""
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("torch loaded: "), r.stderr
    error = next((x for x in lines if x.startswith("loratool: ")), "")
    return r.returncode, error, lines[-1] == "torch loaded: True"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT and its fine-tune (biases and norms change), a PEFT adapter with a full
    tensor (modules_to_save), a plain one, a GGUF file and a pipeline folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("first-line")
    torch.manual_seed(0)
    m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                             type_vocab_size=2)).eval()
    m.save_pretrained(d / "base")
    finetuned(m, noise=0.01).save_pretrained(d / "tuned")
    for name, extra in (("plain", {}), ("full", {"modules_to_save": ["pooler"]})):
        p = get_peft_model(BertModel.from_pretrained(d / "base"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
            **extra))
        p.save_pretrained(d / name)
    import gguf

    w = gguf.GGUFWriter(d / "model.gguf", "llama")
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (d / "pipe" / "unet").mkdir(parents=True)
    (d / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    (d / "exists").mkdir()
    (d / "exists" / "config.json").write_text("{}")
    return d


def cases(d: Path) -> dict[str, list[object]]:
    o = d / "new"
    return {
        "merge: output exists": ["merge", d / "base", d / "plain", "-o", d / "exists"],
        "unmerge: output exists": ["unmerge", d / "base", d / "plain", "-o", d / "exists"],
        "merge: --quant without GGUF": ["merge", d / "base", d / "plain", "-o", o,
                                        "--quant", "Q8_0"],
        "unmerge: --quant": ["unmerge", d / "base", d / "plain", "-o", o, "--quant", "Q8_0"],
        "merge: pipeline and full tensors": ["merge", d / "pipe", d / "full", "-o", o],
        "extract: output exists": ["extract", d / "base", d / "tuned", "-o", d / "exists"],
        "extract: --report exists": ["extract", d / "base", d / "tuned", "-o", o, "--report",
                                     d / "exists"],
        "extract: budget below the fixed cost": ["extract", d / "base", d / "tuned", "-o", o,
                                                 "--budget", "1KB"],
        "combine: output exists": ["combine", d / "plain", d / "plain", "--method", "cat",
                                   "-o", d / "exists"],
        "resize: output exists": ["resize", d / "plain", "--rank", "2", "-o", d / "exists"],
        "convert: output exists": ["convert", d / "plain", "--to", "peft", "-o", d / "exists"],
        "convert: full tensors to kohya": ["convert", d / "full", "--to", "kohya", "-o",
                                           d / "k.safetensors"],
        "export: output exists": ["export", d / "base", d / "plain", "-o", d / "exists"],
        "export: full tensors as inputs": ["export", d / "base", d / "full", "-o", o,
                                           "--adapters-as-inputs"],
        "analyze: --html exists": ["analyze", d / "base", d / "tuned", "--html",
                                   d / "exists" / "config.json"],
    }


@pytest.mark.parametrize("name", list(cases(Path("."))))
def test_a_check_that_needs_no_tensor_fails_before_torch_loads(models, name):
    rc, error, torch_loaded = probe(*cases(models)[name])
    assert rc in (1, 2) and error, (name, error)
    assert not torch_loaded, f"{name}: refused only after torch was imported: {error}"
    assert not (models / "new").exists()


def test_the_early_refusals_say_what_the_verbs_say(models):
    """The same input refused by the command line before torch and by the Python API after
    reading it: one message (the budget's figures included)."""
    d = models
    api = {
        "merge: pipeline and full tensors": lambda: loratool.merge(d / "pipe", [d / "full"],
                                                                   d / "new"),
        "extract: budget below the fixed cost": lambda: loratool.extract(
            d / "base", d / "tuned", d / "new",
            policy=loratool.RankPolicy.of(budget="1KB")),
        "export: full tensors as inputs": lambda: loratool.export(
            d / "base", [d / "full"], d / "new", adapters_as_inputs=True),
        "merge: --quant without GGUF": lambda: loratool.merge(d / "base", [d / "plain"],
                                                              d / "new", quant="Q8_0"),
    }
    for name, call in api.items():
        with pytest.raises(loratool.LoraToolError) as e:
            call()
        _, error, _ = probe(*cases(d)[name])
        assert error == f"loratool: error: {e.value}", name


def test_the_budget_refusal_counts_what_extract_writes(models, tmp_path):
    """The fixed cost refused before torch is the fixed part of an adapter written at a
    large budget, measured in its file: everything but the factors (changed biases, norms,
    the embeddings stored in full)."""
    out = tmp_path / "big"
    cli("extract", models / "base", models / "tuned", "-o", out, "--budget", "10MB")
    raw = (out / "adapter_model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    fixed = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                if k != "__metadata__" and not k.endswith(("lora_A.weight", "lora_B.weight")))
    assert fixed > 0
    rc, error, torch_loaded = probe("extract", models / "base", models / "tuned", "-o",
                                    tmp_path / "small", "--budget", f"{fixed - 1}B")
    assert rc == 1 and not torch_loaded and f"the {fixed:,} bytes" in error, error
    rc, error, _ = probe("extract", models / "base", models / "tuned", "-o",
                         tmp_path / "enough", "--budget", f"{fixed}B")
    assert "written whatever the ranks" not in error


def test_the_first_line_says_what_the_command_is_about_to_do(models, tmp_path):
    """In a terminal: a status line first, taken away before the report (nothing of it
    is left on the screen's last line); with --quiet or without a terminal, none."""
    rc, out = run_in_terminal("merge", models / "base", models / "plain", "-o",
                              tmp_path / "m")
    assert rc == 0, out
    first = out.lstrip("\r\x1b[K")
    assert first.startswith(f"loratool merge: merging {models / 'plain'} into "), out
    status_end = out.index("…") + 1
    assert out[status_end:].startswith("\r\x1b[K"), out  # cleared before anything else
    assert "wrote " in out[status_end:]
    rc, out = run_in_terminal("-q", "merge", models / "base", models / "plain", "-o",
                              tmp_path / "q")
    assert rc == 0 and "merging" not in out, out
    r = subprocess.run([sys.executable, "-m", "loratool", "merge", models / "base",
                        models / "plain", "-o", tmp_path / "p"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "merging" not in r.stderr + r.stdout, r.stderr


def test_an_error_replaces_the_status_line(models):
    rc, out = run_in_terminal("merge", models / "base", models / "plain", "-o",
                              models / "exists")
    assert rc == 1
    status, _, rest = out.partition("…")
    assert "loratool merge: merging" in status
    assert rest.startswith("\r\x1b[Kloratool: error: output "), out


def test_export_names_each_step_on_its_bar(models, tmp_path):
    """The export bar says what each long step is (it was a bare "0/3 step" for the 30 s of
    a trace)."""
    rc, out = run_in_terminal("export", models / "base", models / "plain", "-o",
                              tmp_path / "onnx")
    assert rc == 0, out
    for step in ("loading the model and merging the adapters", "tracing the ONNX graph",
                 "checking the graph in onnxruntime"):
        assert f"export: {step}" in out, out
