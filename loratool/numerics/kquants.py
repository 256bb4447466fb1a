"""GGUF K-quants (Q2_K … Q6_K) written in torch, byte for byte what ggml's reference quantizer
(``quantize_row_q4_K_ref`` etc. in ggml-quants.c, the code ``llama-quantize`` runs without an
importance matrix) writes for the same float32 input.

ggml quantizes each super-block of 256 values on its own, searching per sub-block of 16 or 32
values for the scale and minimum that fit best; every sum is a float32 sum in index order and
every rounding goes through ``nearest_int``. To give the same bytes, this module keeps both:
the sub-blocks of a tensor are laid out value-index first (``[32, N]``) so that each step of a
sum is one vectorised float32 add over all N sub-blocks at once, in ggml's order, and rounding
uses ggml's own trick (add 1.5·2²³, read the bits). Branches become masks (``torch.where``).

Example::
    data = quantize_k(torch.randn(4, 512), "Q4_K")     # 4 rows × 2 super-blocks × 144 bytes
    len(data) == 4 * 2 * 144
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = 1e-15  # ggml's "all zero" threshold


def f32(v: float) -> float:
    """A constant as C's float arithmetic holds it (exactly representable as a double)."""
    return float(np.float32(v))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5·2²³ in float32 and read the low mantissa bits (round half to
    even, and the same answer as ggml's for values it asserts never come)."""
    bits = (v + 12582912.0).view(torch.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).to(torch.float32)


def _div(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t rounded once (``c / t`` in torch is ``t.reciprocal() * c``: two roundings)."""
    return torch.full_like(t, c).div_(t)


def _seq(parts: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over dim 0 as a C loop adds: ((0 + p₀) + p₁) + …, each step rounded to float32."""
    s = torch.zeros_like(parts[0]) if start is None else start.clone()
    for p in parts[1:] if start is not None else parts:
        s.add_(p)
    return s


def _max_first(x: torch.Tensor) -> torch.Tensor:
    """The value of largest |x| per column, the first one where several tie (ggml's ``>``)."""
    return x.gather(0, x.abs().argmax(0, keepdim=True))[0]


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
              nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants for N sub-blocks at once: ``x`` and ``w`` are ``[n, N]``.
    Returns (scale [N], the_min [N], L [n, N] as floats).

    Written for speed as much as for ggml's order: the search's 20-odd steps run over
    buffers allocated once (``out=``), and the three sums of a step are one stacked
    ``[n, 3, N]`` tensor added up row by row."""
    n = x.shape[0]
    mn = x.amin(0)
    mx = x.amax(0)
    sum_w = _seq(w, w[0])
    sum_x = _seq(w * x, w[0] * x[0])
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    mn0 = mn  # what a flat sub-block returns (ggml stops before its search)
    flat = mx == mn
    v = torch.empty_like(x)  # scratch: iscale·(x − min), then the error terms
    laux = torch.empty_like(x)
    prods = torch.empty((n, 3, x.shape[1]), dtype=x.dtype)  # w·l, w·l·l, w·l·x

    def levels(iscale: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # |iscale·(x − min)| ≤ 2·(nmax + 1) here, where ggml's nearest_int is round half to
        # even, as adding and taking away 1.5·2²³ in float32 is
        torch.sub(x, m, out=v).mul_(iscale)
        return v.add_(12582912.0).sub_(12582912.0).clamp_(0, nmax).clone() if out is None \
            else out.copy_(v.add_(12582912.0).sub_(12582912.0).clamp_(0, nmax))

    def err(scale: torch.Tensor, lv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        torch.mul(lv, scale, out=v).add_(m).sub_(x)  # scale·l + min − x, as ggml rounds it
        v.abs_() if use_mad else v.mul_(v)
        return _seq(v.mul_(w))

    iscale = _div(nmax, mx - mn)
    scale = _div(1.0, iscale)
    L = levels(iscale, mn, torch.empty_like(x))
    best = err(scale, L, mn)
    for step in range(nstep + 1):
        c = f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax)
        levels(_div(c, mx - mn), mn, laux)
        wl = torch.mul(w, laux, out=prods[:, 0])
        torch.mul(wl, laux, out=prods[:, 1])
        torch.mul(wl, x, out=prods[:, 2])
        sum_l, sum_l2, sum_xl = _seq(prods)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, laux, this_min)
        better = (D > 0) & (cur < best)
        if not bool(better.any()):
            continue
        torch.where(better, laux, L, out=L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    zero = torch.zeros_like(scale)
    return (torch.where(flat, zero, scale), -torch.where(flat, mn0, mn),
            torch.where(flat, torch.zeros_like(L), L))


def make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 and no importance weights (Q6_K), ``x`` [n, N].
    Returns (scale [N], L [n, N] in 0 … 2·nmax−1)."""
    mx = _max_first(x)
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        return lv, _seq(wx * lv), _seq(w * lv * lv)

    lv, sumlx, suml2 = sums(_div(-nmax, mx))
    L = lv + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = sums(_div(-f32(nmax + f32(f32(0.1) * step)), mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, lv + nmax, L)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, L)


def make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse (Q3_K), ``x`` [n, N]: a first rounding, then up to
    five passes that move one value at a time while the weighted fit improves.
    Returns (scale [N], L [n, N] in 0 … 2·nmax−1)."""
    mx = _max_first(x)
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    L = nearest_int(_div(-nmax, mx) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seq(wx * L), _seq(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            take = ((sumlx - wx[i] * li) > 0) & (new != li) & (sl2 > 0) & (
                slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):  # a pass that changes nothing would repeat itself
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, L + nmax)


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


def _half(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 value as ggml stores it in a block (float16, round to nearest even): its two
    bytes and the float32 it reads back as."""
    h = v.to(torch.float16)
    return h.view(torch.uint8).reshape(-1, 2), h.to(torch.float32)


def _u8(v: torch.Tensor) -> torch.Tensor:
    """C's int → uint8_t: the low byte."""
    return (v.to(torch.int32) & 0xFF).to(torch.uint8)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and mins [nb, 8] into 12 bytes, as ggml packs them."""
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    out = torch.zeros(ls.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out.to(torch.uint8)


def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Shared by Q4_K and Q5_K: sub-blocks of 32, make_qkx2 with weights av_x + |x|, 6-bit
    scales and mins. Returns (d bytes, dmin bytes, 12 scale bytes, L [nb, 256])."""
    nb = x.shape[0]
    xs = _sub(x, 32)
    # sqrtf is correctly rounded; torch's float32 sqrt may be off by one unit in the last
    # place (its vectorised kernel), a float64 sqrt rounded once to float32 is not
    av_x = torch.sqrt((_seq(xs * xs) / 32).double()).float()
    scales, mins, L = make_qkx2(xs, av_x + xs.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.view(nb, 8), mins.view(nb, 8)
    L = _unsub(L, nb)
    zero = torch.zeros(nb)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _div(63.0, max_min), zero)
    ls = _u8(nearest_int(inv_scale[:, None] * scales)).clamp_(max=63)
    lm = _u8(nearest_int(inv_min[:, None] * mins)).clamp_(max=63)
    d_bytes, d = _half(max_scale / 63.0)
    m_bytes, dmin = _half(max_min / 63.0)
    dj = d[:, None] * ls.float()
    dm = dmin[:, None] * lm.float()
    xv = x.view(nb, 8, 32)
    q = nearest_int((xv + dm[..., None]) / dj[..., None]).clamp_(0, nmax)
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, QK_K).to(torch.uint8)
    return d_bytes, m_bytes, _pack_k4_scales(ls, lm), L


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _q45_k(x, 15, -1.0, 20)
    L = L.view(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d, dmin, scales, qs], 1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _q45_k(x, 31, -0.5, 15)
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


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    xs = _sub(x, 16)
    scales, mins, L = make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.view(nb, 16), mins.view(nb, 16)
    L = _unsub(L, nb)
    zero = torch.zeros(nb)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = torch.where(has_s[:, None], nearest_int(_div(15.0, max_scale)[:, None] * scales), 0.0)
    lm = torch.where(has_m[:, None], nearest_int(_div(15.0, max_min)[:, None] * mins), 0.0)
    sb = _u8(ls.to(torch.int32) | (lm.to(torch.int32) << 4))
    d_bytes, d = _half(torch.where(has_s, max_scale / 15.0, zero))
    m_bytes, dmin = _half(torch.where(has_m, max_min / 15.0, zero))
    dj = d[:, None] * (sb & 0xF).float()
    dm = dmin[:, None] * (sb >> 4).float()
    q = nearest_int((x.view(nb, 16, 16) + dm[..., None]) / dj[..., None]).clamp_(0, 3)
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, QK_K)
    return torch.cat([sb, _pack_2bit(L), d_bytes, m_bytes], 1)


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, L = make_q3(_sub(x, 16), 4)
    scales = scales.view(nb, 16)
    L = _unsub(L, nb)
    max_scale = _max_first(scales.t())
    has = max_scale != 0
    iscale = _div(-32.0, max_scale)
    l6 = (_u8(nearest_int(iscale[:, None] * scales)).view(torch.int8).to(torch.int32)
          .clamp_(-32, 31) + 32)
    l6 = torch.where(has[:, None], l6, torch.zeros_like(l6))
    sc = torch.zeros(nb, 12, dtype=torch.int32)
    sc[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = (l6 >> 4).view(nb, 4, 4)  # [nb, j // 4, j % 4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d_bytes, d = _half(torch.where(has, _div(1.0, iscale), torch.zeros(nb)))
    dj = d[:, None] * (l6 - 32).float()
    q = nearest_int(x.view(nb, 16, 16) / dj[..., None]).clamp_(-4, 3) + 4
    L = torch.where((dj != 0)[..., None], q, L).reshape(nb, 8, 32).to(torch.int32)
    high = (L > 3).to(torch.int32)  # value 32·b + m: bit b of hmask[m]
    hmask = (high << torch.arange(8, dtype=torch.int32)[None, :, None]).sum(1)
    return torch.cat([hmask.to(torch.uint8), _pack_2bit((L - 4 * high).reshape(nb, QK_K)),
                      sc.to(torch.uint8), d_bytes], 1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, L = make_qx(_sub(x, 16), 32)
    scales = scales.view(nb, 16)
    L = _unsub(L, nb)
    max_scale = _max_first(scales.t())
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128.0, max_scale)
    s8 = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    s8 = _u8(s8).view(torch.int8)
    d_bytes, d = _half(_div(1.0, iscale))
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


def quantize_k(t: torch.Tensor, type_name: str) -> bytes:
    """``t`` (any shape whose size is a multiple of 256, rows of whole super-blocks) as
    ``type_name`` bytes, ggml's reference quantizer's."""
    x = t.detach().to("cpu", torch.float32).reshape(-1, QK_K)
    return QUANTIZERS[type_name](x).numpy().tobytes()
