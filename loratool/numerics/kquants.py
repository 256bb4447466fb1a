"""GGUF K-quants (Q2_K … Q6_K) written in torch, byte for byte what ggml writes for the same
float32 input: ``quantize_q4_K`` etc. in ggml-quants.c, the function ``llama-quantize`` calls —
its reference quantizer without an importance matrix, its weighted one with (``--imatrix``).

ggml quantizes each super-block of 256 values on its own, searching per sub-block of 16 or 32
values for the scale and minimum that fit best (``ksearch``), then quantizes those scales to 4,
6 or 8 bits against one float16 per super-block, and the values again against the stored
scales. This module lays the super-blocks out for the searches and packs the bytes as ggml does.

Example::
    data = quantize_k(torch.randn(4, 512), "Q4_K")     # 4 rows × 2 super-blocks × 144 bytes
    len(data) == 4 * 2 * 144
    quantize_k(w, "Q6_K", imatrix=im)                   # im: one weight per column of w
"""

from __future__ import annotations

import torch

from .ksearch import (
    GROUP_MAX_EPS,
    as_blocks,
    div_once,
    half_bytes,
    make_q3,
    make_qkx2,
    make_qp,
    make_qx,
    max_first,
    nearest_int,
    seq_sum,
    sqrt_f32,
)

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _sub(x: torch.Tensor, n: int) -> torch.Tensor:
    """Super-blocks [nb, 256] as sub-blocks value-index first: [n, nb·256/n]."""
    return x.reshape(-1, n).t().contiguous()


def _unsub(v: torch.Tensor, nb: int) -> torch.Tensor:
    """[n, nb·S] back to [nb, S, n]."""
    n = v.shape[0]
    return v.t().reshape(nb, -1, n)


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``max = 0; if (v > max) max = v`` per row: +0.0 unless some value is above it
    (a −0.0 never replaces it)."""
    m = v.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _u8(v: torch.Tensor) -> torch.Tensor:
    """C's int → uint8_t: the low byte."""
    return (v.to(torch.int32) & 0xFF).to(torch.uint8)


def _weights(x: torch.Tensor, qw: torch.Tensor, n: int, twice: bool) -> tuple[torch.Tensor, ...]:
    """The weighted searches' weights, qw·√(σ² + x²) with σ² = (2·)Σx²/256 per super-block
    (Q4_K, Q5_K, Q3_K: 2·; Q2_K: 1·), as sub-blocks [n, N], and their sums per sub-block."""
    nb = x.shape[0]
    xb = _sub(x, QK_K)
    sumx2 = seq_sum(xb * xb)
    sigma2 = (sumx2 * 2 if twice else sumx2) / QK_K
    xs = _sub(x, n)
    w = _sub(qw, n) * sqrt_f32(sigma2.repeat_interleave(QK_K // n)[None, :] + xs * xs)
    return xs, w, seq_sum(w).view(nb, QK_K // n)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and mins [nb, 8] into 12 bytes, as ggml packs them."""
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    out = torch.zeros(ls.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return (out & 0xFF).to(torch.uint8)


def _unpack_k4_scales(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 for all eight sub-blocks: the scales and mins as stored."""
    q = q.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc.float(), m.float()


def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int, qw: torch.Tensor | None
           ) -> tuple[torch.Tensor, ...]:
    """Shared by Q4_K and Q5_K: sub-blocks of 32, 6-bit scales and mins.
    Returns (d bytes, dmin bytes, 12 scale bytes, L [nb, 256])."""
    nb = x.shape[0]
    if qw is None:  # quantize_row_q4_K_ref: weights av_x + |x|, scales against the largest
        xs = _sub(x, 32)
        av_x = sqrt_f32(seq_sum(xs * xs) / 32)
        scales, mins, L = make_qkx2(xs, av_x + xs.abs(), nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        zero = torch.zeros(nb)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = torch.where(max_scale > 0, div_once(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, div_once(63.0, max_min), zero)
        ls = _u8(nearest_int(inv_scale[:, None] * scales)).clamp_(max=63)
        lm = _u8(nearest_int(inv_min[:, None] * mins)).clamp_(max=63)
        d_block, m_block = max_scale / 63.0, max_min / 63.0
    else:  # quantize_row_q4_K_impl: importance-weighted search, scales fitted by make_qp
        xs, w, sw = _weights(x, qw, 32, True)
        scales, mins, L = make_qkx2(xs, w, nmax, -0.9, 0.05, 36, False)
        d_block, ls = make_qp(scales.view(nb, 8).t(), 63, sw.t())
        m_block, lm = make_qp(mins.view(nb, 8).t(), 63, sw.t())
        ls, lm = ls.t(), lm.t()
        if nmax == 31:  # Q5_K clamps, Q4_K does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    L = _unsub(L, nb)
    d_bytes, d = half_bytes(d_block)
    m_bytes, dmin = half_bytes(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    dj, dm = d[:, None] * sc, dmin[:, None] * m
    q = nearest_int((x.view(nb, 8, 32) + dm[..., None]) / dj[..., None]).clamp_(0, nmax)
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, QK_K).to(torch.uint8)
    return d_bytes, m_bytes, packed, L


def _q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, dmin, scales, L = _q45_k(x, 15, -1.0, 20, qw)
    L = L.view(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d, dmin, scales, qs], 1)


def _q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, dmin, scales, L = _q45_k(x, 31, -0.5, 15, qw)
    L = L.view(-1, 4, 2, 32)  # [nb, k, half, j]: value 64k + 32·half + j
    high = (L >> 4).to(torch.int32)
    low = L & 0xF
    bit = torch.tensor([[1, 2], [4, 8], [16, 32], [64, 128]], dtype=torch.int32)  # 1 << (2k+h)
    qh = (high * bit[None, :, :, None]).sum((1, 2)).to(torch.uint8)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d, dmin, scales, qh, qs], 1)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K: 256 2-bit values into 64 bytes: byte j/4 + l of half j holds values
    j + l, j + l + 32, j + l + 64, j + l + 96."""
    L = L.view(-1, 2, 4, 32).to(torch.int32)
    q = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return q.reshape(-1, 64).to(torch.uint8)


def _q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    if qw is None:  # quantize_row_q2_K_ref: weights |x|, 4-bit scales against the largest
        xs = _sub(x, 16)
        scales, mins, L = make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        zero = torch.zeros(nb)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = torch.where(has_s[:, None], nearest_int(div_once(15.0, max_scale)[:, None] * scales),
                         0.0)
        lm = torch.where(has_m[:, None], nearest_int(div_once(15.0, max_min)[:, None] * mins),
                         0.0)
        d_block = torch.where(has_s, max_scale / 15.0, zero)
        m_block = torch.where(has_m, max_min / 15.0, zero)
    else:  # quantize_row_q2_K_impl
        xs, w, sw = _weights(x, qw, 16, False)
        scales, mins, L = make_qkx2(xs, w, 3, -0.9, 0.05, 36, False)
        d_block, ls = make_qp(scales.view(nb, 16).t(), 15, sw.t())
        m_block, lm = make_qp(mins.view(nb, 16).t(), 15, sw.t())
        ls, lm = ls.t(), lm.t()
    L = _unsub(L, nb)
    sb = _u8(ls.to(torch.int32) | (lm.to(torch.int32) << 4))
    d_bytes, d = half_bytes(d_block)
    m_bytes, dmin = half_bytes(m_block)
    dj = d[:, None] * (sb & 0xF).float()
    dm = dmin[:, None] * (sb >> 4).float()
    q = nearest_int((x.view(nb, 16, 16) + dm[..., None]) / dj[..., None]).clamp_(0, 3)
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, QK_K)
    return torch.cat([sb, _pack_2bit(L), d_bytes, m_bytes], 1)


def _q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    if qw is None:  # quantize_row_q3_K_ref: make_q3_quants, 6-bit scales against the largest
        scales, L = make_q3(_sub(x, 16), 4)
        scales = scales.view(nb, 16)
        max_scale = max_first(scales.t())
        has = max_scale != 0
        iscale = div_once(-32.0, max_scale)
        l6 = (_u8(nearest_int(iscale[:, None] * scales)).view(torch.int8).to(torch.int32)
              .clamp_(-32, 31) + 32)
        l6 = torch.where(has[:, None], l6, torch.zeros_like(l6))
        d_block = torch.where(has, div_once(1.0, iscale), torch.zeros(nb))
    else:  # quantize_row_q3_K_impl: weighted make_qx_quants for the values and the scales
        xs, w, sw = _weights(x, qw, 16, True)
        scales, L = make_qx(xs, 4, w)
        d_block, l6 = make_qx(scales.view(nb, 16).t(), 32, sw.t())
        l6 = l6.t().to(torch.int32)
    L = _unsub(L, nb)
    sc = torch.zeros(nb, 12, dtype=torch.int32)
    sc[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = (l6 >> 4).view(nb, 4, 4)  # [nb, j // 4, j % 4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d_bytes, d = half_bytes(d_block)
    dj = d[:, None] * (l6 - 32).float()
    q = nearest_int(x.view(nb, 16, 16) / dj[..., None]).clamp_(-4, 3) + 4
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, 8, 32).to(torch.int32)
    high = (L > 3).to(torch.int32)  # value 32·b + m: bit b of hmask[m]
    hmask = (high << torch.arange(8, dtype=torch.int32)[None, :, None]).sum(1)
    return torch.cat([hmask.to(torch.uint8), _pack_2bit((L - 4 * high).reshape(nb, QK_K)),
                      (sc & 0xFF).to(torch.uint8), d_bytes], 1)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]  # quantize_row_q6_K_impl differs from _ref only in make_qx's weights
    scales, L = make_qx(_sub(x, 16), 32, None if qw is None else _sub(qw, 16))
    scales = scales.view(nb, 16)
    L = _unsub(L, nb)
    max_scale = max_first(scales.t())
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = div_once(-128.0, max_scale)
    s8 = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    s8 = _u8(s8).view(torch.int8)
    d_bytes, d = half_bytes(div_once(1.0, iscale))
    dj = d[:, None] * s8.float()
    q = nearest_int(x.view(nb, 16, 16) / dj[..., None]).clamp_(-32, 31) + 32
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, 2, 4, 32).to(torch.int32)
    ql = torch.stack([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                      (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], 2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), s8.view(torch.uint8), d_bytes], 1)
    out[zero] = 0  # ggml zeroes the whole block (its d is +0.0)
    return out


QUANTIZERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_k(t: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> bytes:
    """``t`` (rows of whole super-blocks of 256) as ``type_name`` bytes, as ggml's
    ``quantize_q*_K`` writes them; ``imatrix``: the importance of each column (the last
    dimension; a leading dimension per expert where ``t`` has one), as llama-quantize passes
    an imatrix entry, or None for ggml's reference quantizer."""
    return QUANTIZERS[type_name](*as_blocks(t, QK_K, imatrix)).numpy().tobytes()
