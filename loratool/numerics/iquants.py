"""GGUF IQ4_NL and IQ4_XS written in torch, byte for byte what ggml writes for the same float32
input: ``quantize_iq4_nl`` and ``quantize_iq4_xs`` in ggml-quants.c, the functions
``llama-quantize`` calls (with an importance matrix where ``--imatrix`` gives one).

Both store each value as an index into sixteen fixed, non-uniform levels (``LEVELS``) times a
scale per block of 32: IQ4_NL a float16 scale per block, IQ4_XS a float16 per super-block of
256 and a 6-bit scale per block of 32. ggml picks each block's scale by trying fifteen and
keeping the best weighted least-squares fit; the steps here are those, for every block at once,
in ggml's float32 order (``ksearch``'s conventions: values value-index first, sums in index
order).

Example::
    data = quantize_iq4(torch.randn(4, 512), "IQ4_XS")   # 4 rows × 2 super-blocks × 136 bytes
    len(data) == 4 * 2 * 136
"""

from __future__ import annotations

import torch

from .ksearch import (
    GROUP_MAX_EPS,
    as_blocks,
    div_once,
    half_bytes,
    max_first,
    nearest_int,
    seq_sum,
    sqrt_f32,
)

# ggml's kvalues_iq4nl: the sixteen levels, sorted
LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=torch.float32)
BLOCK_BYTES = {"IQ4_NL": 18, "IQ4_XS": 136}
SUPER = {"IQ4_NL": 32, "IQ4_XS": 256}  # values under one float16 scale
NTRY = 7  # what quantize_iq4_nl and quantize_iq4_xs pass: scales (−127 ± 7)/max tried


# ggml's best_index_int8 picks the nearest level, the upper one on a tie, comparing float32
# differences al − lower and upper − al. Near a midpoint those differences are exact (al's
# ulp divides them and they are smaller than al), so it is "how many midpoints are ≤ al"; the
# midpoints are multiples of ½, so that count is a table lookup on ⌊2·al⌋: two passes and one
# gather instead of a binary search per value (tests/test_kquants.py checks it against the
# search written out).
_LO, _HI = 2 * int(LEVELS[0]), 2 * int(LEVELS[-1])  # ⌊2·al⌋ beyond these: the end levels
_MIDS2 = (LEVELS[:-1] + LEVELS[1:]).to(torch.int64)  # 2·midpoint, an integer
_INDEX = (torch.arange(_LO, _HI + 1)[:, None] >= _MIDS2[None, :]).sum(1)  # per ⌊2·al⌋ − _LO
_LEVEL = LEVELS[_INDEX]


def _lookup(table: torch.Tensor, al: torch.Tensor) -> torch.Tensor:
    """``table`` at ⌊2·al⌋'s row (NaN as the top one: ggml's search ends there), al's shape."""
    cell = (al * 2).floor_().nan_to_num_(nan=_HI).clamp_(_LO, _HI).sub_(_LO).int()
    return table.index_select(0, cell.view(-1)).view(al.shape)  # faster than table[cell]


def best_index(al: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8 for every value: the nearest level's index, the upper one where
    ``al − lower < upper − al`` is false; NaN → 15."""
    return _lookup(_INDEX, al)


def _sums(x: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·q·x and Σ w·q·q over each block's 32 values (index order) for the levels q of
    x·iscale; ``x``, ``w`` [32, N], ``iscale`` [N]."""
    q = _lookup(_LEVEL, x * iscale)
    wq = w * q
    prods = torch.empty((x.shape[0], 2, x.shape[1]))  # [32, 2, N]: both sums row by row
    torch.mul(wq, x, out=prods[:, 0])
    torch.mul(wq, q, out=prods[:, 1])
    s = seq_sum(prods)
    return s[0], s[1]


def _block_scales(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The scale ggml's search keeps for each block of 32 (``x``, ``w`` [32, N]; ``rows``: the
    same blocks as rows, [N, 32]); 0 for a block whose largest magnitude is below ggml's
    all-zero threshold."""
    ax = rows.abs()
    first = ax.argmax(1, keepdim=True)  # the first of the largest |x| (ggml's strict >)
    mx = rows.gather(1, first)[:, 0]
    zero = ax.gather(1, first)[:, 0] < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)  # any nonzero: these blocks give 0 below
    d = (-mx) / LEVELS[0]  # -max/values[0]: max/127 rounded once
    sumqx, sumq2 = _sums(x, w, div_once(1.0, d))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _sums(x, w, div_once(float(itry + int(LEVELS[0])), mx))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _inverse(v: torch.Tensor) -> torch.Tensor:
    """``v ? 1/v : 0`` rounded once."""
    return torch.where(v != 0, div_once(1.0, v), torch.zeros_like(v))


def _pack(L: torch.Tensor) -> torch.Tensor:
    """Levels [nb, n] (n a multiple of 32) as ggml packs them: byte 16·i + j of a block holds
    value 32·i + j in its low nibble and value 32·i + 16 + j in its high one."""
    L = L.reshape(L.shape[0], -1, 2, 16).to(torch.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _iq4(x: torch.Tensor, qw: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """Super-blocks ``x`` [nb, 32 or 256] (importance ``qw`` alike, or None) as ggml's
    quantize_row_iq4_nl_impl writes them."""
    nb, n = x.shape
    xs = x.reshape(-1, 32).t().contiguous()  # [32, nb·n/32]: blocks of 32, value-index first
    if qw is None:
        w = xs * xs
    else:
        xb = x.t().contiguous()
        sigma2 = seq_sum(xb * xb) * (2.0 / n)  # exact: 2/n is a power of two
        w = qw.reshape(-1, 32).t() * sqrt_f32(sigma2.repeat_interleave(n // 32)[None, :] + xs * xs)
    scales = _block_scales(xs, w, x.reshape(-1, 32))
    if type_name == "IQ4_NL":  # one block, its own float16 scale; levels against the float32 one
        L = best_index(xs * _inverse(scales)).t()
        return torch.cat([half_bytes(scales)[0], _pack(L)], 1)
    per = scales.view(nb, n // 32)
    ms = max_first(per.t())
    ms = torch.where(ms.abs() > 0, ms, torch.zeros_like(ms))  # ggml's max starts at +0
    d = (-ms) / 32.0
    ls = nearest_int(_inverse(d)[:, None] * per).clamp_(-32, 31)
    dl = (d[:, None] * ls).reshape(-1)
    L = best_index(xs * _inverse(dl)).t().reshape(nb, n)
    lv = (ls + 32).to(torch.int32)  # 0 … 63: low nibbles two to a byte, high 2 bits in a u16
    low = lv & 0xF
    scales_l = (low[:, 0::2] | (low[:, 1::2] << 4)).to(torch.uint8)
    shifts = 2 * torch.arange(8, dtype=torch.int32)
    high = ((lv >> 4) << shifts).sum(1)
    scales_h = torch.stack([high & 0xFF, high >> 8], 1).to(torch.uint8)
    return torch.cat([half_bytes(d)[0], scales_h, scales_l, _pack(L)], 1)


QUANTIZERS = ("IQ4_NL", "IQ4_XS")


def quantize_iq4(t: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> bytes:
    """``t`` (rows of whole blocks) as ``type_name`` bytes, as ggml's ``quantize_iq4_nl`` /
    ``quantize_iq4_xs`` write them; ``imatrix``: the importance of each column (the last
    dimension), as llama-quantize passes an imatrix entry, or None."""
    x, qw = as_blocks(t, SUPER[type_name], imatrix)
    return _iq4(x, qw, type_name).numpy().tobytes()
