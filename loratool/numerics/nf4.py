"""bitsandbytes' 4-bit quantization (NF4 and FP4, with or without double quantization of the
block scales), quantized and dequantized again in torch, value for value as bitsandbytes'
CUDA kernels compute it: the base weights a QLoRA adapter was trained against.

What bitsandbytes does (``quantize_4bit`` / ``dequantize_4bit``, csrc/kernels.cu):

- the tensor, flattened, in blocks of ``blocksize`` values (64; the last block may be short);
  ``absmax`` = max |x| per block, in float32;
- each value times the block's reciprocal ``1/absmax`` (float32), then its 4-bit code: NF4 by
  a tree of 15 thresholds (the midpoints of the 16 NF4 levels of the QLoRA paper), FP4 by a
  sign bit and a tree of 7 thresholds on |x|;
- dequantized, ``level[code] * absmax`` in float32, rounded once to the weights' dtype;
- double quantization (``compress_statistics``, transformers' ``bnb_4bit_use_double_quant``):
  the float32 absmax vector less its mean (``offset``) is quantized again, 8 bits per value
  with bitsandbytes' signed dynamic map, in blocks of 256, by CUDA's binary search
  (nearest level, ties to the lower); dequantized as ``map[q] * absmax2 + offset``.

An all-zero block has ``absmax`` 0 and ``1/absmax`` infinite: CUDA's ``0 · ∞`` is NaN, which
every threshold test rejects, so its code is 0; emulated here (the block dequantizes to
zeros, NF4's as −0). Codes are kept one per uint8 (bitsandbytes packs two per byte; the
values are the same).

Example::

    fmt = FourBit("nf4", double_quant=True)
    Wq = roundtrip(W, fmt)                   # W's dtype: what the QLoRA model computed with
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoraToolError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # double quantization's blocks of absmax values (bitsandbytes' fixed)

# the 16 NF4 levels (QLoRA, appendix E; bitsandbytes' nf4_dequantization_lut)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# dQuantizeNF4's thresholds (each the float32 midpoint of two levels), ascending
NF4_THRESHOLDS = (-0.8480964004993439, -0.6106329262256622, -0.4599952697753906,
                  -0.33967943489551544, -0.23460740596055984, -0.13791173323988914,
                  -0.045525018125772476, 0.03979014977812767, 0.1202552504837513,
                  0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                  0.5016634166240692, 0.6427869200706482, 0.8614784181118011)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, divided by 12): the magnitude of each 3-bit code
FP4_MAGNITUDES = (0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25)
# dQuantizeFP4's thresholds on |x|, ascending, and the 3-bit code of each magnitude rank
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333,
                  0.8333333)
FP4_RANK_CODE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


@dataclass(frozen=True)
class FourBit:
    """How bitsandbytes quantized the base: ``quant_type`` nf4 or fp4, ``blocksize``,
    ``double_quant`` (the absmax quantized again). ``dtype``: the weights' dtype when they
    were quantized (the dtype transformers loaded the model in; None: the base's own);
    ``compute_dtype``: the dtype the layer computed in (the dequantized weight is cast to it;
    None: no cast).

    Example::
        FourBit("nf4", 64, True, "bf16", "bf16")
    """

    quant_type: str
    blocksize: int = 64
    double_quant: bool = False
    dtype: str | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise LoraToolError(f"4-bit type {self.quant_type!r}: bitsandbytes has nf4 and fp4")
        if self.blocksize not in BLOCKSIZES:
            raise LoraToolError(f"block size {self.blocksize}: bitsandbytes takes "
                                f"{', '.join(map(str, BLOCKSIZES))}")

    def describe(self) -> str:
        """One line: ``nf4, blocks of 64, double quantization, bf16``."""
        parts = [self.quant_type, f"blocks of {self.blocksize}"]
        parts.append("double quantization" if self.double_quant else "no double quantization")
        if self.dtype:
            parts.append(f"weights in {self.dtype}")
        if self.compute_dtype:
            parts.append(f"computed in {self.compute_dtype}")
        return ", ".join(parts)


@dataclass
class Quantized:
    """A tensor as bitsandbytes stores it: one 4-bit code per value (uint8), the float32
    absmax per block, or (double quantization) its 8-bit codes, their own float32 absmax per
    256 and the offset."""

    codes: torch.Tensor
    absmax: torch.Tensor | None
    shape: tuple[int, ...]
    fmt: FourBit
    absmax_codes: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``, 256 sorted levels in
    [−1, 1]), built as it builds it: float32 linspaces, scaled in float32."""
    data: list[float] = []
    for i in range(7):  # max_exponent_bits 7, total_bits 8, signed
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """``x`` flattened to float32 rows of ``blocksize``, the last padded with zeros (as CUDA
    loads a short block: zeros change no |x| max), and the true length."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = -n % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize), n


def _scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each value times its block's reciprocal absmax (float32, as the kernel: 1/absmax once,
    then a product), the absmax, the length."""
    rows, n = _blocks(x, blocksize)
    absmax = rows.abs().amax(dim=1)
    inv = torch.reciprocal(absmax)  # ∞ for an all-zero block, and 0·∞ = NaN as on CUDA
    return rows * inv.unsqueeze(1), absmax, n


def _tree(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The rank a threshold tree gives (how many thresholds x exceeds); NaN ranks 0, as every
    comparison in the tree is false for it."""
    rank = torch.bucketize(x, thresholds)  # #{t : t < x}
    return rank.masked_fill_(torch.isnan(x), 0).to(torch.uint8)


def _nearest_dynamic(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """CUDA's ``dQuantize<0>``: a binary search of the 256 sorted levels from the middle, then
    the nearer neighbour by float32 midpoints (ties to the lower; NaN to level 0)."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lo_p, up_p = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lo, up = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lo_p, lo = torch.where(gt, pivot, lo_p), torch.where(gt, val, lo)
        up_p, up = torch.where(gt, up_p, pivot), torch.where(gt, up, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    up = torch.where(up_p == 255, code[255], up)
    lo = torch.where(lo_p == 0, code[0], lo)
    gt = x > val
    q = torch.where(gt, torch.where(x > (up + val) * 0.5, up_p, pivot),
                    torch.where(x < (lo + val) * 0.5, lo_p, pivot))
    return q.to(torch.uint8)


def quantize(W: torch.Tensor, fmt: FourBit) -> Quantized:
    """``W`` (float16, bfloat16 or float32, any shape) quantized as ``quantize_4bit`` does."""
    if not W.dtype.is_floating_point:
        raise LoraToolError(f"4-bit quantization takes float tensors, not {W.dtype}")
    x, absmax, n = _scaled(W, fmt.blocksize)
    if fmt.quant_type == "nf4":
        codes = _tree(x, torch.tensor(NF4_THRESHOLDS, dtype=torch.float32, device=x.device))
    else:
        neg = (x < 0).to(torch.uint8) << 3  # NaN and −0 are not < 0: sign bit clear
        rank = _tree(x.abs(), torch.tensor(FP4_THRESHOLDS, dtype=torch.float32,
                                           device=x.device))
        codes = torch.tensor(FP4_RANK_CODE, dtype=torch.uint8, device=x.device)[
            rank.long()] | neg
    q = Quantized(codes.reshape(-1)[:n], absmax, tuple(W.shape), fmt)
    if fmt.double_quant:
        q.offset = absmax.mean()  # torch's float32 mean, as bitsandbytes takes it
        code = dynamic_map().to(x.device)
        x2, q.absmax2, _ = _scaled(absmax - q.offset, NESTED_BLOCKSIZE)
        q.absmax_codes = _nearest_dynamic(x2, code).reshape(-1)[:absmax.numel()]
        q.absmax = None
    return q


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_4bit``: ``level[code] · absmax`` in float32, rounded once to ``dtype``."""
    absmax = q.absmax
    if absmax is None:  # double quantization: map[q] · absmax2, then + offset (float32)
        assert q.absmax_codes is not None and q.absmax2 is not None and q.offset is not None
        code = dynamic_map().to(q.absmax_codes.device)
        rows, m = _blocks(code[q.absmax_codes.long()], NESTED_BLOCKSIZE)
        absmax = (rows * q.absmax2.unsqueeze(1)).reshape(-1)[:m] + q.offset
    dev = q.codes.device
    if q.fmt.quant_type == "nf4":
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=dev)
    else:  # the sign applied to the level, as dDequantizeFP4Tree: code 8 is −0
        mags = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=dev)
        levels = torch.cat([mags, -mags])
    rows, n = _blocks(levels[q.codes.long()], q.fmt.blocksize)
    out = (rows * absmax.unsqueeze(1)).reshape(-1)[:n]
    return out.to(dtype).reshape(q.shape)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def roundtrip(W: torch.Tensor, fmt: FourBit, transposed: bool = False, name: str = ""
              ) -> torch.Tensor:
    """dequantize(quantize(W)): the weight the QLoRA model computed with, in the dtype it
    computed in (``fmt.compute_dtype`` if set, else the quantized dtype). ``W`` is first cast
    to ``fmt.dtype`` (the dtype transformers loaded it in) when set. ``transposed``: the
    layer is a GPT-2 Conv1D, whose weight transformers transposes before quantizing.

    Example::
        roundtrip(torch.randn(4, 100, dtype=torch.bfloat16), FourBit("nf4")).dtype  # bf16
    """
    if not bool(torch.isfinite(W).all()):
        raise LoraToolError(f"{name or 'the base'} holds NaN or Inf: bitsandbytes' "
                            "quantization of it is undefined; merge into the base the "
                            "adapter was trained on (it had none)")
    load = DTYPES[fmt.dtype] if fmt.dtype else W.dtype
    x = W.to(load)
    if transposed:
        x = x.t()
    out = dequantize(quantize(x, fmt), load)
    if transposed:
        out = out.t().contiguous()
    return out.to(DTYPES[fmt.compute_dtype]) if fmt.compute_dtype else out
