"""The docs' examples run as written: every ``loratool`` line of a page's bash blocks through
the CLI, then every python block in order, in one namespace, in a folder that holds what the
page names."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import torch
from conftest import cli, finetuned, minilm_dir, needs_minilm

DOCS = Path(__file__).parents[1] / "docs"


def blocks(page: Path, lang: str) -> list[str]:
    """The fenced code blocks of ``lang`` in a markdown page, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def run_shell_lines(block: str) -> None:
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("loratool "):
            cli(*shlex.split(line)[1:])


@needs_minilm
def test_sentence_transformers_page(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    src = minilm_dir()
    shutil.copytree(src, tmp_path / "base")
    shutil.copytree(src, tmp_path / "all-MiniLM-L6-v2")
    model = AutoModel.from_pretrained(src)
    finetuned(model, noise=0.01).save_pretrained(tmp_path / "t")
    shutil.copytree(src, tmp_path / "tuned")  # a sentence-transformers folder, tuned weights
    shutil.copy(tmp_path / "t" / "model.safetensors", tmp_path / "tuned" / "model.safetensors")
    shutil.copytree(tmp_path / "tuned", tmp_path / "minilm-tuned")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModel.from_pretrained(src), LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value", "dense"],
        init_lora_weights=False))
    peft.save_pretrained(tmp_path / "ad")
    monkeypatch.chdir(tmp_path)
    page = DOCS / "sentence-transformers.md"
    for block in blocks(page, "bash"):
        run_shell_lines(block)
    scope: dict[str, object] = {}
    for block in blocks(page, "python"):
        exec(compile(block, str(page), "exec"), scope)  # noqa: S102
    assert {"merged", "with_adapter", "embeddings"} <= set(scope)
    assert (tmp_path / "merged" / "1_Pooling").is_dir() and os.path.isdir("onnx")
