"""Every adapter and model loratool writes, loaded by the library its users load it with.

PEFT's ``PeftModel.from_pretrained`` (its own unmerged forward) must give the outputs of
loratool's merge as transformers loads it, for every extract option that changes what is
written, for combine and resize outputs and for adapters converted through kohya and diffusers;
on Llama (no biases), BERT (biases, LayerNorms, three lookup tables) and GPT-2 (Conv1D, tied
embeddings). A merged real all-MiniLM-L6-v2 must give sentence-transformers the tuned model's
embeddings, and extract → merge → unmerge must give it back.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import finetuned, llama_config, minilm_dir, needs_minilm, run_cli, tiny_gpt2

from loratool.io.tensors import open_checkpoint

IDS = torch.tensor([[1, 7, 42, 9, 3, 5], [2, 11, 4, 8, 6, 10]])


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config()).eval()
    if kind == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=100,
                                    max_position_embeddings=32)).eval()
    return tiny_gpt2()


def _output(model, kind: str):
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=mask)
    return out.last_hidden_state if kind == "bert" else out.logits


def _load(folder, kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["llama", "bert", "gpt2"])
def pair(request, tmp_path_factory):
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    base = _model(kind)
    base.save_pretrained(d / "base")
    finetuned(base).save_pretrained(d / "tuned")
    return kind, d, base


def _peft_agrees_with_our_merge(kind, d, base, adapter, tag):
    """The adapter in PEFT (unmerged forward) against loratool's merge in transformers."""
    from peft import PeftModel

    res = run_cli("merge", d / "base", adapter, "-o", d / f"merged-{tag}")
    assert res.rc == 0, res.err
    ours = _output(_load(d / f"merged-{tag}", kind), kind)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    theirs = _output(peft_model, kind)
    assert (ours - theirs).abs().max() <= 1e-5, tag
    return ours


EXTRACTS = {
    "default": [],  # bias changes as lora_B.bias, norms and embeddings in full
    "embed-lora": ["--embed-lora"],  # embedding LoRA: biases stored in full instead
    "budget": ["--budget", "30000"],
    "budget-embed": ["--budget", "60000", "--embed-lora"],
    "skip-full": ["--skip-full"],
    "max-error": ["--max-error", "0.05"],
}


@pytest.mark.parametrize("option", list(EXTRACTS))
def test_extracted_adapters_load_in_peft(pair, option):
    kind, d, base = pair
    out = d / f"ex-{option}"
    res = run_cli("extract", d / "base", d / "tuned", "-o", out, "--json", *EXTRACTS[option])
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    if option == "embed-lora":
        assert any(m["layout"] == "embedding" for m in rep["modules"])
        assert not cfg["lora_bias"]  # PEFT refuses lora_bias with embedding LoRA
    ours = _peft_agrees_with_our_merge(kind, d, base, out, option)
    if option != "skip-full":  # and the adapter reproduces the fine-tune, up to its error
        tuned = _output(_load(d / "tuned", kind), kind)
        assert (ours - tuned).abs().max() <= 0.05 * tuned.abs().max()


def test_combined_and_resized_adapters_load_in_peft(pair):
    kind, d, base = pair
    for tag, args in (("c-a", ["--rank", "4"]), ("c-b", ["--rank", "8", "--skip-full"])):
        assert run_cli("extract", d / "base", d / "tuned", "-o", d / tag, *args).rc == 0
    for tag, args in (
            ("cat", ["combine", d / "c-a", d / "c-b", "--method", "cat", "--weight", "1",
                     "--weight", "0.5"]),
            ("svd", ["combine", d / "c-a", d / "c-b", "--method", "svd", "--rank", "6"]),
            ("ties", ["combine", d / "c-a", d / "c-b", "--method", "ties", "--rank", "6"]),
            ("resize", ["resize", d / "c-b", "--rank", "2"])):
        res = run_cli(*args, "-o", d / f"out-{tag}")
        assert res.rc == 0, res.err
        _peft_agrees_with_our_merge(kind, d, base, d / f"out-{tag}", tag)


@pytest.mark.parametrize("via", ["kohya", "diffusers"])
def test_adapters_converted_and_back_load_in_peft(pair, via):
    kind, d, base = pair
    src = d / f"conv-src-{via}"
    assert run_cli("extract", d / "base", d / "tuned", "-o", src, "--skip-full").rc == 0
    mid = d / f"conv-{via}" / ("lora.safetensors" if via == "kohya" else "x")
    args = ["--drop-unsupported"] if kind != "llama" else []  # kohya has no lora_B bias
    res = run_cli("convert", src, "--to", via, "-o", mid, *args)
    assert res.rc == 0, res.err
    back = d / f"conv-back-{via}"
    res = run_cli("convert", mid, "--to", "peft", "-o", back)
    assert res.rc == 0, res.err
    _peft_agrees_with_our_merge(kind, d, base, back, f"back-{via}")


# --------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The real all-MiniLM-L6-v2 folder (1_Pooling/, modules.json, tokenizer …) and a
    fine-tuned copy of it, as sentence-transformers saves them: weight matrices changed by
    1 % of their norm (‖ΔW‖/‖W‖ of fine-tunes is typically 10⁻³–10⁻²)."""
    import shutil

    from transformers import AutoModel

    d = tmp_path_factory.mktemp("minilm")
    shutil.copytree(minilm_dir(), d / "base")
    shutil.copytree(minilm_dir(), d / "tuned")
    tuned = finetuned(AutoModel.from_pretrained(d / "base"), rank=8, noise=0.002, size=0.01)
    tuned.save_pretrained(d / "tuned")
    return d


SENTENCES = ["Merging an adapter into the base model.", "A cat sat on the mat.",
             "LoRA factorises the weight update.", "Quarterly revenue grew by four percent."]


def _embed(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(SENTENCES,
                                                                 convert_to_tensor=True)


@needs_minilm
def test_merged_minilm_gives_the_tuned_sentence_embeddings(minilm):
    d = minilm
    res = run_cli("extract", d / "base", d / "tuned", "-o", d / "ad", "--max-error", "0.01")
    assert res.rc == 0, res.err
    res = run_cli("merge", d / "base", d / "ad", "-o", d / "merged")
    assert res.rc == 0, res.err
    # the folder stays a sentence-transformers model: every non-weight file and subfolder
    for rel in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "tokenizer.json", "vocab.txt"):
        assert (d / "merged" / rel).read_bytes() == (d / "base" / rel).read_bytes(), rel
    got, want = _embed(d / "merged"), _embed(d / "tuned")
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert float(cos.min()) >= 0.9999, cos


def _train(model, steps: int = 12, lr: float = 5e-5):
    """A real (short) fine-tune: AdamW on an in-batch contrastive loss over sentence pairs,
    as sentence-transformers trains retrieval models; every parameter moves."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    queries = ["how to merge a lora", "capital of france", "boil an egg", "fix a flat tire",
               "learn python fast", "best time to plant tomatoes", "why is the sky blue",
               "convert celsius to fahrenheit"]
    answers = ["fold the adapter into the base weights", "Paris is the capital of France",
               "put the egg in boiling water for nine minutes", "patch the tube and inflate it",
               "write small programs every day", "plant tomatoes after the last frost",
               "air scatters blue light more than red", "multiply by nine fifths, add 32"]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def embed(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(20 * embed(queries) @ embed(answers).T,
                                                 torch.arange(len(queries)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@needs_minilm
def test_minilm_extract_merge_unmerge_gives_the_base_back(minilm):
    """On a real fine-tune (AdamW steps: every tensor changes, the embeddings by weight decay
    only): the defaults store embeddings and LayerNorms in full, the rest as LoRA; unmerge
    gives the base back bit for bit with the merge's exact record, and within float32
    rounding without it."""
    from transformers import AutoModel

    d = minilm
    tuned = _train(AutoModel.from_pretrained(d / "base"))
    import shutil

    shutil.copytree(d / "base", d / "trained")
    tuned.save_pretrained(d / "trained")
    res = run_cli("extract", d / "base", d / "trained", "-o", d / "ad0", "--json")
    assert res.rc == 0, res.err
    full = json.loads(res.out)["full_tensors"]
    assert full  # LayerNorms, lookup tables and unpaired biases are stored in full
    # without the exact record: (W + ΔW) − ΔW, exact up to float32 rounding
    assert run_cli("merge", d / "base", d / "ad0", "-o", d / "m1", "--no-exact-record").rc == 0
    res = run_cli("unmerge", d / "m1", d / "ad0", "-o", d / "u1", "--verify")
    assert res.rc == 0, res.err
    base, back = open_checkpoint(d / "base"), open_checkpoint(d / "u1")
    assert list(back.tensors) == list(base.tensors)
    same = total = 0
    for name in base.tensors:
        a, b = base.load(name), back.load(name)
        if name in full:
            assert torch.equal(a, b), name  # restored from the merge's record, exactly
        same += int((a == b).sum())
        total += a.numel()
    assert 0.99 <= same / total < 1, same / total
    assert _embed(d / "u1").allclose(_embed(d / "base"), atol=1e-6)
    # with it (the default): the base bit for bit; the record holds exactly the values the
    # round trip above lost, and says how many
    res = run_cli("merge", d / "base", d / "ad0", "-o", d / "m0", "--json")
    assert res.rc == 0, res.err
    exact = json.loads(res.out)["exact"]
    assert exact["values"] == total - same, (exact, total - same)
    res = run_cli("unmerge", d / "m0", d / "ad0", "-o", d / "u0", "--verify", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["exact"]["values"] == total - same
    back = open_checkpoint(d / "u0")
    for name in base.tensors:
        a, b = base.load(name), back.load(name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32)), name
    print(f"exact record: {exact['values']:,} values of {exact['changed_values']:,} changed "
          f"({exact['bytes']:,} bytes)")
