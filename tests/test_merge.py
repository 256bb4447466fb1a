"""merge and unmerge against PEFT's own merge, float64 references, and every failure path."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from conftest import llama_config, run_cli, tiny_gpt2, tree

from loratool.io.tensors import open_checkpoint


def _gpt2(dtype=torch.float32):
    return tiny_gpt2(dtype=dtype, tie_word_embeddings=False)


def _llama(dtype=torch.float32, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(**kw)).to(dtype).eval()


CASES = {
    "lora+patterns": (_llama, dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 16})),
    "rslora": (_llama, dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["o_proj",
                                                                               "up_proj"])),
    "dora": (_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                          use_dora=True)),
    "gpt2-conv1d+bias": (_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                     lora_bias=True)),
    "embedding+modules_to_save": (_llama, dict(r=4, lora_alpha=8, target_modules=[
        "embed_tokens", "k_proj"], modules_to_save=["lm_head"])),
}


def _setup(tmp_path, case, dtype=torch.float32, seed=1, realistic=False):
    """Base + PEFT adapter. ``realistic``: B scaled so that ‖ΔW‖ ≈ 2 % of ‖W‖, as after
    fine-tuning (PEFT's random test init makes ΔW as large as W)."""
    from peft import LoraConfig, get_peft_model

    build, kw = CASES[case]
    base = build(dtype)
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.25)
        for name, mod in model.named_modules():
            if realistic and hasattr(mod, "lora_B") and "default" in mod.lora_B:
                W = mod.base_layer.weight.float()
                d = mod.get_delta_weight("default").float()
                mod.lora_B["default"].weight.mul_(0.02 * W.norm() / d.norm())
    model.save_pretrained(tmp_path / "adapter")
    return base, model


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_equals_peft_merge_bit_for_bit(tmp_path, case):
    from transformers import AutoModelForCausalLM

    base, model = _setup(tmp_path, case)
    before = tree(tmp_path)
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged",
                  "--verify")
    assert res.rc == 0, res.err
    assert "verify:" in res.out
    peft_merged = copy.deepcopy(model).merge_and_unload()
    ref = peft_merged.state_dict()
    out = open_checkpoint(tmp_path / "merged")
    changed = 0
    for name in out.tensors:
        got = out.load(name)
        if not torch.equal(got, base.state_dict()[name]):
            changed += 1
        assert torch.equal(got, ref[name]), name
    assert changed > 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, peft_merged(ids).logits)
    now = tree(tmp_path)
    assert {k: v for k, v in now.items() if not k.startswith("merged")} == before


def _exact(base_sd, adapter_dir, weight=1.0):
    """float64 reference: W + w·s·B@A per module (LoRA only)."""
    from loratool.formats import read_adapter

    ad = read_adapter(str(adapter_dir))
    ref = {k: v.double() for k, v in base_sd.items()}
    for m in ad.modules.values():
        ref[m.name + ".weight"] = ref[m.name + ".weight"] + weight * m.delta(torch.float64)
    return ref


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_half_precision_is_the_exact_result_rounded_once(tmp_path, dtype, flag):
    base, _ = _setup(tmp_path, "lora+patterns", dtype=dtype)
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m",
                  "--verify", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["verify"]["ok"]
    ref = _exact(base.state_dict(), tmp_path / "adapter")
    out = open_checkpoint(tmp_path / "m")
    same = total = 0
    for name in out.tensors:
        got = out.load(name)
        assert got.dtype == dtype
        want = ref[name].to(dtype)  # rounded once, from float64
        same += int((got == want).sum())
        total += got.numel()
    assert same / total >= 0.999, same / total


def test_round_trip_fp32_and_bf16(tmp_path):
    fractions = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = tmp_path / str(dtype)
        base, _ = _setup(d, "lora+patterns", dtype=dtype, realistic=True)
        # the float32 round trip itself (the exact record would put the rest back)
        assert run_cli("merge", d / "base", d / "adapter", "-o", d / "m",
                       "--no-exact-record").rc == 0
        res = run_cli("unmerge", d / "m", d / "adapter", "-o", d / "u", "--verify")
        assert res.rc == 0, res.err
        out, sd = open_checkpoint(d / "u"), base.state_dict()
        same = total = 0
        for name in out.tensors:
            got, want = out.load(name), sd[name]
            if dtype == torch.float32:
                assert torch.allclose(got, want, rtol=0, atol=1e-5), name
            same += int((got == want).sum())
            total += got.numel()
        fractions[str(dtype)] = same / total
        merged = open_checkpoint(d / "m")
        changed = back = 0
        for n in sd:  # the same fraction among the values the merge changed
            moved = merged.load(n).ne(sd[n])
            changed += int(moved.sum())
            back += int((out.load(n) == sd[n])[moved].sum())
        fractions[str(dtype) + " of changed values"] = back / changed
    # the measure is over all values; the changed ones are reported too (docs/math.md)
    assert fractions["torch.bfloat16"] >= 0.99, fractions
    assert fractions["torch.bfloat16 of changed values"] >= 0.95, fractions
    print("bit-exact fraction after merge → unmerge:", fractions)


def test_the_exact_record_gives_the_base_back_bit_for_bit(tmp_path):
    """bf16 and fp32, several adapters with weights: the record holds the values the round
    trip loses, unmerge puts them back; unmerging with another weight leaves them out where
    the recomputation differs, and says where."""
    for dtype in (torch.float32, torch.bfloat16):
        d = tmp_path / str(dtype)
        base, _ = _setup(d, "lora+patterns", dtype=dtype, realistic=True)
        _setup(d / "b", "rslora", dtype=dtype, seed=2, realistic=True)
        res = run_cli("merge", d / "base", d / "adapter", d / "b" / "adapter", "--weight", "1",
                      "--weight", "0.5", "-o", d / "m", "--json")
        assert res.rc == 0, res.err
        merged = json.loads(res.out)
        assert merged["exact"]["values"] > 0 and merged["record"], merged
        res = run_cli("unmerge", d / "m", d / "adapter", d / "b" / "adapter", "--weight", "1",
                      "--weight", "0.5", "-o", d / "u", "--json")
        assert res.rc == 0, res.err
        assert json.loads(res.out)["exact"]["values"] == merged["exact"]["values"]
        out, sd = open_checkpoint(d / "u"), base.state_dict()
        for name in out.tensors:
            got = out.load(name)
            assert got.dtype == sd[name].dtype and torch.equal(got, sd[name]), name
        res = run_cli("unmerge", d / "m", d / "adapter", d / "b" / "adapter", "--weight", "1",
                      "--weight", "0.25", "-o", d / "other", "--json")
        assert res.rc == 0, res.err
        other = json.loads(res.out)["exact"]  # the tensors b changes differ; a's alone do not
        assert other["not_applied"] and other["values"] < merged["exact"]["values"], other


def test_several_adapters_with_weights(tmp_path):
    base, _ = _setup(tmp_path / "a", "lora+patterns", seed=1)
    _setup(tmp_path / "b", "rslora", seed=2)
    res = run_cli("merge", tmp_path / "a" / "base", tmp_path / "a" / "adapter",
                  tmp_path / "b" / "adapter", "--weight", "0.5", "--weight", "-1.5", "-o",
                  tmp_path / "m", "--verify")
    assert res.rc == 0, res.err
    ref = _exact(base.state_dict(), tmp_path / "a" / "adapter", 0.5)
    from loratool.formats import read_adapter

    for m in read_adapter(str(tmp_path / "b" / "adapter")).modules.values():
        ref[m.name + ".weight"] = ref[m.name + ".weight"] - 1.5 * m.delta(torch.float64)
    out = open_checkpoint(tmp_path / "m")
    for name in out.tensors:
        assert torch.allclose(out.load(name, dtype=torch.float64), ref[name], atol=1e-6), name
    res = run_cli("merge", tmp_path / "a" / "base", tmp_path / "a" / "adapter", "--weight", "1",
                  "--weight", "2", "-o", tmp_path / "m2")
    assert res.rc == 1 and "one per adapter" in res.err


def test_dora_unmerge_uses_recorded_norms_and_refuses_without(tmp_path):
    base, _ = _setup(tmp_path, "dora")
    assert run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m").rc == 0
    assert (tmp_path / "m" / "loratool-unmerge.safetensors").exists()
    res = run_cli("unmerge", tmp_path / "m", tmp_path / "adapter", "-o", tmp_path / "u",
                  "--verify")
    assert res.rc == 0, res.err
    out = open_checkpoint(tmp_path / "u")
    assert not (tmp_path / "u" / "loratool-unmerge.safetensors").exists()
    for name, want in base.state_dict().items():
        assert torch.allclose(out.load(name), want, atol=1e-5), name
    os.remove(tmp_path / "m" / "loratool-unmerge.safetensors")
    before = tree(tmp_path)
    res = run_cli("unmerge", tmp_path / "m", tmp_path / "adapter", "-o", tmp_path / "u2")
    assert res.rc == 1 and "DoRA cannot be undone" in res.err
    assert tree(tmp_path) == before


def test_replaced_tensors_are_recorded_and_restored_exactly(tmp_path):
    """modules_to_save replaces tensors: merge records the ones it replaced, unmerge puts
    them back bit for bit, and refuses (saying how to fix it) without the record or for an
    adapter that is not the one merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "model.norm"],
        init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.25)
    model.save_pretrained(tmp_path / "a")
    res = run_cli("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "m")
    assert res.rc == 0 and "recorded 2 tensors replaced in full" in res.out, res.out + res.err
    res = run_cli("unmerge", tmp_path / "m", tmp_path / "a", "-o", tmp_path / "u", "--verify")
    assert res.rc == 0, res.err
    back = open_checkpoint(tmp_path / "u")
    for name in ("lm_head.weight", "model.norm.weight"):
        assert torch.equal(back.load(name), base.state_dict()[name]), name
    # another adapter than the one merged: refused, nothing written
    other = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "b")
    res = run_cli("unmerge", tmp_path / "m", tmp_path / "b", "-o", tmp_path / "u2")
    assert res.rc == 1 and "does not give the merged tensor" in res.err, res.err
    assert not (tmp_path / "u2").exists()
    # without the record: what to do instead
    res = run_cli("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "m2",
                  "--no-record")
    assert res.rc == 0 and not (tmp_path / "m2" / "loratool-unmerge.safetensors").exists()
    res = run_cli("unmerge", tmp_path / "m2", tmp_path / "a", "-o", tmp_path / "u3")
    assert res.rc == 1 and "merge with `loratool merge`" in res.err, res.err
    assert not (tmp_path / "u3").exists()


def test_dora_with_another_adapter_on_the_same_module_is_refused(tmp_path):
    _setup(tmp_path / "a", "dora", seed=1)
    _setup(tmp_path / "b", "lora+patterns", seed=2)
    res = run_cli("merge", tmp_path / "a" / "base", tmp_path / "a" / "adapter",
                  tmp_path / "b" / "adapter", "-o", tmp_path / "m")
    assert res.rc == 1 and "DoRA" in res.err and not (tmp_path / "m").exists()


def test_tied_lm_head_refused_then_untied(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "base").tensors
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, target_modules=["lm_head"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m")
    assert res.rc == 1 and "tie" in res.err and "--untie" in res.err
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m",
                  "--untie")
    assert res.rc == 0, res.err
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not m.config.tie_word_embeddings
    sd = m.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], base.state_dict()[
        "model.embed_tokens.weight"])  # the input embedding did not change
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, model(ids).logits, atol=1e-5)


def test_bad_merges_leave_nothing(tmp_path, peft_dir, llama_dir):
    base, _ = _setup(tmp_path / "g", "gpt2-conv1d+bias")
    before = tree(tmp_path)

    def bad(args, *needles):
        res = run_cli("merge", *args)
        assert res.rc == 1, res
        assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
        for n in needles:
            assert n in res.err, (n, res.err)
        assert tree(tmp_path) == before

    # an adapter for another model: names the module and both shapes
    bad([tmp_path / "g" / "base", peft_dir, "-o", tmp_path / "m"], "no tensor")
    shutil.copytree(llama_dir, tmp_path / "other")
    before = tree(tmp_path)
    bad([tmp_path / "other", tmp_path / "g" / "adapter", "-o", tmp_path / "m"], "no tensor")
    (tmp_path / "exists").mkdir()
    before = tree(tmp_path)
    bad([tmp_path / "g" / "base", tmp_path / "g" / "adapter", "-o", tmp_path / "exists"],
        "already exists", "--force")
    bad([tmp_path / "g" / "base", tmp_path / "g" / "adapter", "-o",
         tmp_path / "g" / "base" / "sub"], "overlaps input")
    bad([tmp_path / "g" / "base", tmp_path / "g" / "adapter", "-o", tmp_path / "m", "--device",
         "cuda:7"], "cuda")


def test_nan_adapter_and_fp16_overflow(tmp_path):
    from safetensors.torch import load_file, save_file

    _setup(tmp_path, "lora+patterns")
    p = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(p)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    big = dict(state)
    big[key] = state[key] * 1e6
    save_file(big, p)
    before = tree(tmp_path)
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m",
                  "--dtype", "fp16")
    assert res.rc == 1 and "exceeds the largest float16" in res.err, res.err
    assert tree(tmp_path) == before
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    save_file(state, p)
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m")
    assert res.rc == 1 and "NaN" in res.err and not (tmp_path / "m").exists()


def test_sigkill_leaves_no_complete_looking_output_and_rerun_succeeds(tmp_path):
    """SIGKILL cannot be caught: the temporary folder stays, but it is hidden and named
    .partial, the output path does not exist, and a rerun succeeds and removes it."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from loratool.verbs.demo import build_pair

    base, _, adapter = build_pair(tmp_path / "w", max_shard_size="300KB")
    before = tree(tmp_path / "w")
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out),
           "--max-shard-size", "300KB"]
    code = ("import sys, time, loratool.io.writer as w\n"
            "add = w.CheckpointWriter.add\n"
            "def slow(self, *a):\n    print('writing', flush=True)\n    time.sleep(0.05)\n"
            "    add(self, *a)\n"
            "w.CheckpointWriter.add = slow\n"
            "from loratool.cli import main\nmain(" + repr(cmd[3:]) + ")\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"  # killed while shards are being written
    time.sleep(random.uniform(0.0, 0.8))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    leftovers = [n for n in os.listdir(tmp_path) if n not in ("w", "merged")]
    assert all(n.startswith(".merged.") and n.endswith((".partial", ".lock"))
               for n in leftovers)
    assert tree(tmp_path / "w") == before
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert open_checkpoint(out).tensors
    assert sorted(os.listdir(tmp_path)) == ["merged", "w"]  # the killed run's leftovers too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(tmp_path):
    _setup(tmp_path, "lora+patterns")
    for dev in ("cpu", "cuda"):
        res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / dev,
                      "--device", dev, "--verify")
        assert res.rc == 0, res.err
    a, b = open_checkpoint(tmp_path / "cpu"), open_checkpoint(tmp_path / "cuda")
    for name in a.tensors:
        assert torch.allclose(a.load(name), b.load(name), rtol=1e-6, atol=1e-6), name


def test_nan_in_the_base_is_caught(tmp_path):
    from safetensors.torch import load_file, save_file

    _setup(tmp_path, "lora+patterns")
    p = tmp_path / "base" / "model.safetensors"
    state = load_file(p)
    key = "model.layers.1.self_attn.q_proj.weight"
    state[key][40, 3] = float("nan")
    save_file(state, p, metadata={"format": "pt"})
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m")
    assert res.rc == 1 and key in res.err and "NaN" in res.err
    assert not (tmp_path / "m").exists()


def test_verify_also_scans_tensors_copied_unchanged(tmp_path):
    """merge computes and checks only what adapters change; an Inf elsewhere in the base is
    copied as it is, and --verify finds it before anything is published."""
    from safetensors.torch import load_file, save_file

    _setup(tmp_path, "lora+patterns")
    p = tmp_path / "base" / "model.safetensors"
    state = load_file(p)
    key = "model.layers.0.mlp.up_proj.weight"  # no adapter touches it
    state[key][1, 2] = float("inf")
    save_file(state, p, metadata={"format": "pt"})
    assert run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m").rc == 0
    res = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "v",
                  "--verify")
    assert res.rc == 1 and key in res.err and "copied unchanged" in res.err, res.err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("omp", [None, "3"])
def test_merge_uses_fewer_threads_than_cores_and_restores_them(tmp_path, monkeypatch, omp):
    """Streaming work on every core stalls when one core is busy elsewhere: the merge runs
    with half the cores (at most 4; OMP_NUM_THREADS wins) and gives torch's setting back."""
    import loratool.verbs.merge_checkpoint as merge

    _setup(tmp_path, "lora+patterns", seed=1)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    cores = len(os.sched_getaffinity(0))
    seen = []
    real = merge.merge_into

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(merge, "merge_into", spy)
    before = torch.get_num_threads()
    assert run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o",
                   tmp_path / "m").rc == 0
    assert seen == [int(omp) if omp else max(1, min(4, cores // 2))]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("cores, threads, omp, want", [
    (2, None, None, 2),    # one streaming thread leaves a core idle: a worker for it
    (4, None, None, 2),    # two streaming threads, two workers: every core busy
    (16, None, None, 4),   # at most 4 streaming threads: never fewer workers than those
    (2, 3, None, 3),       # --threads / Options.threads wins
    (2, None, "1", 1),     # and so does OMP_NUM_THREADS
])
def test_k_quant_workers_fill_the_cores_the_streaming_threads_leave(monkeypatch, cores,
                                                                    threads, omp, want):
    """K-quant workers never wait for each other, so where torch's streaming threads leave
    cores idle, more workers use them; a thread count the user gives is taken as it is."""
    from loratool import Options
    from loratool.numerics import device

    monkeypatch.setattr(device, "_cores", lambda: cores)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert device.quant_workers_count(Options(threads=threads)) == want
