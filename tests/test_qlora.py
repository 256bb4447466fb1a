"""merge --qlora: bitsandbytes' 4-bit quantization reproduced in torch (numerics/nf4.py),
checked against bitsandbytes itself on the CPU, and the merge into dequantize(quantize(W))
checked against a model transformers loads in 4 bits with the PEFT adapter on it.

bitsandbytes' CPU backend differs from its CUDA kernels (which QLoRA training runs, and which
loratool follows) in three narrow places, each tested for what it is: FP4's thresholds (CUDA
uses decimal literals, the CPU float32 midpoints), double quantization's 8-bit codes (the CPU
looks them up in a 65536-entry table, CUDA searches), and an all-zero block (CUDA's 0·∞ is
NaN, code 0; the CPU clamps). Its AVX-512 dequantization also misplaces the scales of rows
whose length is a multiple of 16 but not of the block size (e.g. 96), so those shapes are
left out of the comparison.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, llama_config

from loratool.numerics import nf4

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(64, 128), (5, 77), (3, 100), (33, 65, 3), (256, 512), (1000,)]


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _bnb(W: torch.Tensor, quant_type: str, double: bool, blocksize: int = 64):
    q, state = F.quantize_4bit(W, quant_type=quant_type, blocksize=blocksize,
                               compress_statistics=double)
    return q, state, F.dequantize_4bit(q, state).reshape(W.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_equals_bitsandbytes_bit_for_bit(dtype, shape, blocksize):
    W = _weights(shape, dtype)
    ref = _bnb(W, "nf4", False, blocksize)[2]
    got = nf4.roundtrip(W, nf4.FourBit("nf4", blocksize))
    assert got.dtype == dtype and got.shape == W.shape
    assert torch.equal(got, ref)
    assert not torch.equal(got, W)  # the quantization did something


def test_the_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp4_differs_from_the_cpu_backend_only_between_the_two_thresholds(dtype):
    """CUDA's FP4 thresholds are decimal literals on |x|; bitsandbytes' CPU backend uses the
    float32 midpoints of its signed levels. Values between the two, and negative values on a
    midpoint (the CPU rounds them away from zero, CUDA toward it), get neighbouring codes;
    no other value does."""
    W = _weights((512, 256), dtype, seed=3)
    ref = _bnb(W, "fp4", False)[2]
    got = nf4.roundtrip(W, nf4.FourBit("fp4"))
    rows = W.float().reshape(-1, 64)
    signed = (rows * torch.reciprocal(rows.abs().amax(1, keepdim=True))).reshape(W.shape)
    x = signed.abs()
    levels = torch.tensor(sorted(set(nf4.FP4_MAGNITUDES)), dtype=torch.float32)
    mids = (levels[:-1] + levels[1:]) / 2
    cuda = torch.tensor(nf4.FP4_THRESHOLDS, dtype=torch.float32)
    between = torch.zeros_like(x, dtype=torch.bool)
    for a, b in zip(mids, cuda):
        between |= (x > torch.minimum(a, b)) & (x <= torch.maximum(a, b))
        between |= (x == a) & (signed < 0)
    differ = got != ref
    if dtype == torch.bfloat16:  # bf16 weights land on midpoints: the difference is real
        assert differ.any()
    assert not (differ & ~between).any()
    assert torch.equal(got[~between], ref[~between])


def _unpack(q: torch.Tensor, n: int) -> torch.Tensor:
    b = q.reshape(-1)
    return torch.stack([b >> 4, b & 0xF], 1).reshape(-1)[:n]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantization_follows_bitsandbytes(quant_type, dtype):
    """The absmax's offset, its 8-bit blocks' scales and the dequantization equal
    bitsandbytes'; its 8-bit codes too, except where the CPU backend's lookup table picks a
    level that is not the nearest (CUDA, and loratool, pick the nearest)."""
    W = _weights((384, 320), dtype, seed=5)
    q, state, ref = _bnb(W, quant_type, True)
    ours = nf4.quantize(W, nf4.FourBit(quant_type, double_quant=True))
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    theirs = state.absmax  # bitsandbytes' uint8 codes of the absmax
    differ = ours.absmax_codes != theirs
    assert differ.float().mean() < 0.02
    code = F.create_dynamic_map().double()
    raw = _scaled_absmax(W)
    dist = (raw.unsqueeze(1) - code.unsqueeze(0)).abs()
    nearest = dist.min(1).values
    ours_d = dist.gather(1, ours.absmax_codes.long().unsqueeze(1)).squeeze(1)
    theirs_d = dist.gather(1, theirs.long().unsqueeze(1)).squeeze(1)
    assert torch.allclose(ours_d, nearest, rtol=0, atol=1e-7)  # ours: nearest (float32 mids)
    assert (theirs_d[differ] >= ours_d[differ]).all()
    # dequantized from bitsandbytes' own state, loratool gives bitsandbytes' values
    mine = nf4.Quantized(_unpack(q, W.numel()), None, tuple(W.shape), ours.fmt, theirs,
                         state.state2.absmax, state.offset)
    assert torch.equal(nf4.dequantize(mine, dtype), ref)


def _scaled_absmax(W: torch.Tensor) -> torch.Tensor:
    """The absmax less its mean, over its 256-blocks' absmax, in float64."""
    absmax = W.float().reshape(-1, 64).abs().amax(1)
    d = absmax - absmax.mean()
    pad = -d.numel() % 256
    blocks = torch.cat([d, d.new_zeros(pad)]).reshape(-1, 256)
    s = blocks * torch.reciprocal(blocks.abs().amax(1, keepdim=True))
    return s.reshape(-1)[: d.numel()].double()


def test_an_all_zero_block_is_code_zero_as_on_cuda():
    W = _weights((4, 128), torch.bfloat16)
    W[1] = 0  # blocks 2 and 3
    q = nf4.quantize(W, nf4.FourBit("nf4"))
    assert (q.codes[128:256] == 0).all()  # NaN fails every threshold: level −1.0
    out = nf4.roundtrip(W, nf4.FourBit("nf4"))
    assert (out[1] == 0).all() and torch.signbit(out[1].float()).all()  # −1.0 · 0 = −0
    assert torch.equal(out, _bnb(W, "nf4", False)[2])  # equal values (bnb: +0)


def _tiny(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden_size=128, intermediate_size=256,
                                          vocab_size=256)).to(dtype).eval()
    model.save_pretrained(folder)
    return folder


def _qlora(base: Path, out: Path, double: bool):
    """The QLoRA model as training has it: transformers' 4-bit load on the CPU, a PEFT
    LoRA on it with a small trained-looking change; saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=double,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    qm = LlamaForCausalLM.from_pretrained(base, quantization_config=qc, dtype=torch.bfloat16,
                                          device_map="cpu")
    torch.manual_seed(1)
    pm = get_peft_model(qm, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                       target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    pm.save_pretrained(out)
    return pm


@pytest.fixture(scope="module")
def qlora_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora")
    base = _tiny(d / "base")
    pm = _qlora(base, d / "adapter", double=False)
    return d, base, pm


def test_merge_equals_bitsandbytes_base_plus_peft_delta(qlora_case):
    from safetensors.torch import load_file

    d, base, pm = qlora_case
    r = cli("merge", base, d / "adapter", "-o", d / "m", "--qlora", "nf4", "--json", "--verify")
    rep = json.loads(r.out)["qlora"]
    W = load_file(base / "model.safetensors")
    M = load_file(d / "m" / "model.safetensors")
    linear4 = {n + ".weight" for n, m in pm.named_modules()
               if isinstance(m, bnb.nn.Linear4bit)}
    linear4 = {n.replace("base_model.model.", "").replace(".base_layer", "") for n in linear4}
    assert {t["name"] for t in rep["per_tensor"]} == linear4  # what transformers quantized
    assert rep["kept"] == ["lm_head"] and rep["tensors"] == 14 and rep["changed"] == 6
    lora = {n.replace("base_model.model.", ""): m for n, m in pm.named_modules()
            if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for name in W:
        if name not in linear4:  # norms, embeddings, lm_head: the base's own bytes
            assert torch.equal(M[name].view(torch.int16), W[name].view(torch.int16)), name
            continue
        Wq = _bnb(W[name], "nf4", False)[2].float()
        mod = lora.get(name.removesuffix(".weight"))
        if mod is not None:  # PEFT's own ΔW, in float32 (scale included)
            A = mod.lora_A["default"].weight.float()
            B = mod.lora_B["default"].weight.float()
            Wq = Wq + (B @ A) * mod.scaling["default"]
        assert torch.equal(M[name], Wq.to(torch.bfloat16)), name
    assert 0.05 < rep["rel_base_error"] < 0.15 and rep["error_vs_change"] > 0


@pytest.mark.parametrize("double", [False, True])
def test_merged_logits_are_the_qlora_models(tmp_path, double):
    """The merged bf16 model against PEFT on the 4-bit-loaded base (bitsandbytes' CPU
    forward): within bf16 rounding of the two computations, and much nearer than a plain
    merge into W."""
    from transformers import LlamaForCausalLM

    base = _tiny(tmp_path / "base")
    pm = _qlora(base, tmp_path / "adapter", double)
    cfg = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                   "bnb_4bit_quant_type": "nf4",
                                   "bnb_4bit_use_double_quant": double,
                                   "bnb_4bit_compute_dtype": "bfloat16"}, "dtype": "bfloat16"}
    (tmp_path / "qc.json").write_text(json.dumps(cfg))
    cli("merge", base, tmp_path / "adapter", "-o", tmp_path / "m", "--qlora", "auto",
        "--qlora-config", tmp_path / "qc.json")
    cli("merge", base, tmp_path / "adapter", "-o", tmp_path / "plain")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(input_ids=ids).logits.float()
        got = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)(
            input_ids=ids).logits.float()
        plain = LlamaForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)(
            input_ids=ids).logits.float()
    err, plain_err = float((got - want).abs().max()), float((plain - want).abs().max())
    bound = 4 * 2.0 ** -8 * float(want.abs().max())  # 4 bf16 ulps of the largest logit
    assert err <= bound, (err, bound)
    assert plain_err > 5 * err, (plain_err, err)


CARD = """# adapter

## Training procedure


The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: False
- load_in_4bit: True
- llm_int8_threshold: 6.0
- llm_int8_skip_modules: None
- bnb_4bit_quant_type: fp4
- bnb_4bit_use_double_quant: True
- bnb_4bit_compute_dtype: float16

### Framework versions
"""


def test_auto_reads_the_model_card_and_refuses_without_one(qlora_case, tmp_path):
    d, base, _ = qlora_case
    ad = tmp_path / "adapter"
    shutil.copytree(d / "adapter", ad)
    (ad / "README.md").write_text("# no settings here\n")
    r = cli("merge", base, ad, "-o", tmp_path / "x", "--qlora", "auto", expect=2)
    assert "no quantization config found" in r.err and len(r.err.strip().splitlines()) == 1
    (ad / "README.md").write_text(CARD)
    r = cli("merge", base, ad, "-o", tmp_path / "m", "--qlora", "auto", "--json")
    q = json.loads(r.out)["qlora"]
    assert (q["quant_type"], q["double_quant"], q["compute_dtype"]) == ("fp4", True, "fp16")
    assert q["source"].endswith("README.md")


def test_refusals_are_one_line(qlora_case, tmp_path):
    d, base, pm = qlora_case
    r = cli("unmerge", base, d / "adapter", "-o", tmp_path / "u", "--qlora", "nf4",
            expect=2)
    assert "--qlora applies to merge" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("merge", base, d / "adapter", "-o", tmp_path / "u", "--qlora", "auto",
            "--qlora-double-quant", expect=2)
    assert len(r.err.strip().splitlines()) == 1
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(  # a bnb-4bit save, as the Hub's -bnb-4bit models are
        base, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu",
        dtype=torch.bfloat16).save_pretrained(tmp_path / "bnb")
    r = cli("merge", tmp_path / "bnb", d / "adapter", "-o", tmp_path / "v", "--qlora", "nf4",
            expect=1)
    assert "saved quantized" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_bitsandbytes_cuda_kernels(quant_type, double, dtype):
    """On the GPU, where QLoRA trains: loratool (run there too, so that double
    quantization's mean is CUDA's) equals bitsandbytes' CUDA kernels bit for bit, zero
    blocks, FP4 ties and shapes that are no multiple of 64 included."""
    for shape in [(256, 512), (7, 96), (5, 77), (1000,)]:
        W = _weights(shape, dtype).cuda()
        W.view(-1)[:64] = 0
        ref = _bnb(W, quant_type, double)[2]
        got = nf4.roundtrip(W, nf4.FourBit(quant_type, double_quant=double))
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), shape  # ±0 too
