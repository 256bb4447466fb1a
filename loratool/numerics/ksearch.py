"""ggml's searches for the scale (and minimum) of a sub-block of 16 or 32 values, in torch,
for N sub-blocks at once, with ggml's float32 order of operations (``kquants`` builds the
K-quant blocks from them), and what the block quantizers (``kquants``, ``iquants``) share.

Every function takes the values value-index first, ``x`` of shape ``[n, N]``: each step of a
sum over a sub-block's n values is then one vectorised float32 add over all N sub-blocks, in
ggml's order (the only order giving its bytes), and each of ggml's branches a mask
(``torch.where``). Rounding is ggml's ``nearest_int``; ``c / t`` is rounded once.

Example::
    x = torch.randn(32, 1000)                    # 1000 sub-blocks of 32 values
    scale, the_min, L = make_qkx2(x, x.abs() + 1, 15, -1.0, 0.1, 20, False)
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml's "all zero" threshold


def f32(v: float) -> float:
    """A constant as C's float arithmetic holds it (exactly representable as a double)."""
    return float(np.float32(v))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5·2²³ in float32 and read the low mantissa bits (round half to
    even, and the same answer as ggml's for values it asserts never come)."""
    bits = (v + 12582912.0).view(torch.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).to(torch.float32)


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """sqrtf: correctly rounded. torch's float32 sqrt may be off by one unit in the last place
    (its vectorised kernel); a float64 sqrt rounded once to float32 is not."""
    return torch.sqrt(v.double()).float()


def div_once(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t rounded once (``c / t`` in torch is ``t.reciprocal() * c``: two roundings)."""
    return torch.full_like(t, c).div_(t)


def seq_sum(parts: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over dim 0 as a C loop adds: ((0 + p₀) + p₁) + …, each step rounded to float32."""
    s = torch.zeros_like(parts[0]) if start is None else start.clone()
    for p in parts[1:] if start is not None else parts:
        s.add_(p)
    return s


def half_bytes(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 value as ggml stores it in a block (float16, round to nearest even): its two
    bytes and the float32 it reads back as."""
    h = v.to(torch.float16)
    return h.view(torch.uint8).reshape(-1, 2), h.to(torch.float32)


def as_blocks(t: torch.Tensor, n: int, imatrix: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a quantizer of blocks of ``n`` takes: ``t`` as float32 rows of one block each, and
    the columns' importance (an imatrix entry, a leading dimension per expert where ``t`` has
    one) laid out alike, or None."""
    x = t.detach().to("cpu", torch.float32)
    qw = None
    if imatrix is not None:
        qw = imatrix.to(torch.float32).expand_as(x).reshape(-1, n)
    return x.reshape(-1, n), qw


def max_first(x: torch.Tensor) -> torch.Tensor:
    """The value of largest |x| per column, the first one where several tie (ggml's ``>``)."""
    return x.gather(0, x.abs().argmax(0, keepdim=True))[0]


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
              nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants for N sub-blocks at once: ``x`` and ``w`` are ``[n, N]``.
    Returns (scale [N], the_min [N], L [n, N] as floats).

    Written for speed as much as for ggml's order: the search's 20-odd steps run over
    buffers allocated once (``out=``), the three sums of a step are one stacked ``[n, 3, N]``
    tensor added up row by row, and the levels are not kept per step: each sub-block's
    winning step is remembered by its (iscale, min), and its levels computed again from them
    at the end (the same elementwise operations: the same values)."""
    n = x.shape[0]
    mn = x.amin(0)
    mx = x.amax(0)
    sum_w = seq_sum(w, w[0])
    sum_x = seq_sum(w * x, w[0] * x[0])
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    mn0 = mn  # what a flat sub-block returns (ggml stops before its search)
    flat = mx == mn
    v = torch.empty_like(x)  # scratch: the error terms
    rows_v = v.unbind(0)
    laux = torch.empty_like(x)
    prods = torch.empty((n, 3, x.shape[1]), dtype=x.dtype)  # w·l, w·l·l, w·l·x
    rows_p = prods.unbind(0)

    def levels(iscale: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # |iscale·(x − min)| ≤ 2·(nmax + 1) here, where ggml's nearest_int (adding and taking
        # away 1.5·2²³ in float32) is round half to even, as torch.round is, in one pass; the
        # −0.0 torch.round may give where nearest_int gives 0 adds and multiplies as 0 does
        torch.sub(x, m, out=out).mul_(iscale)
        return out.round_().clamp_(0, nmax)

    def total(rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
        s = torch.zeros_like(rows[0])
        for r in rows:
            s.add_(r)
        return s

    def err(scale: torch.Tensor, lv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        torch.mul(lv, scale, out=v).add_(m).sub_(x)  # scale·l + min − x, as ggml rounds it
        v.abs_() if use_mad else v.mul_(v)
        v.mul_(w)
        return total(rows_v)

    iscale = div_once(nmax, mx - mn)
    scale = div_once(1.0, iscale)
    best = err(scale, levels(iscale, mn, laux), mn)
    win_iscale, win_min = iscale, mn  # the levels of the best fit so far come from these
    for step in range(nstep + 1):
        c = f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax)
        isc = div_once(c, mx - mn)
        levels(isc, mn, laux)
        wl = torch.mul(w, laux, out=prods[:, 0])
        torch.mul(wl, laux, out=prods[:, 1])
        torch.mul(wl, x, out=prods[:, 2])
        sum_l, sum_l2, sum_xl = total(rows_p)
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
        win_iscale = torch.where(better, isc, win_iscale)
        win_min = torch.where(better, mn, win_min)  # the min these levels were made with
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = levels(win_iscale, win_min, torch.empty_like(x))
    zero = torch.zeros_like(scale)
    return (torch.where(flat, zero, scale), -torch.where(flat, mn0, mn),
            torch.where(flat, torch.zeros_like(L), L))


def make_qx(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 (Q6_K; Q3_K with an importance matrix), ``x``
    [n, N], weights ``qw`` [n, N] or x². Returns (scale [N], L [n, N] in 0 … 2·nmax−1)."""
    mx = max_first(x)
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    lv = torch.empty_like(x)
    prods = torch.empty((x.shape[0], 2, x.shape[1]), dtype=x.dtype)  # w·x·l, w·l·l
    rows = prods.unbind(0)

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # |iscale·x| ≤ nmax + 1 (x's largest magnitude sets iscale), where nearest_int is
        # round half to even, as torch.round is (see make_qkx2's levels)
        torch.mul(x, iscale, out=lv).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, lv, out=prods[:, 0])
        torch.mul(w, lv, out=prods[:, 1]).mul_(lv)
        s = torch.zeros_like(rows[0])
        for r in rows:
            s.add_(r)
        return s[0], s[1]

    win = div_once(-nmax, mx)  # the iscale whose levels are the best so far
    sumlx, suml2 = sums(win)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = div_once(-f32(nmax + f32(f32(0.1) * step)), mx)
        sumlx, suml2 = sums(isc)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        win = torch.where(better, isc, win)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    torch.mul(x, win, out=lv).round_().clamp_(-nmax, nmax - 1)
    L = lv + nmax  # the winning step's levels, computed again as they were
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, L)


def make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse (Q3_K), ``x`` [n, N]: a first rounding, then up to
    five passes that move one value at a time while the weighted fit improves.
    Returns (scale [N], L [n, N] in 0 … 2·nmax−1)."""
    mx = max_first(x)
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    L = nearest_int(div_once(-nmax, mx) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = seq_sum(w * x * L), seq_sum(w * L * L)
    sumlx, suml2 = _refine(x, w, L, sumlx, suml2, -nmax, nmax - 1, q3=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, L + nmax)


def _refine(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, sumlx: torch.Tensor,
            suml2: torch.Tensor, lo: int | None, hi: int, q3: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half of make_q3_quants (``q3``) and of make_qp_quants: up to five passes
    over the values, each moving one value's level (in ``L``, in place) to where the
    weighted least-squares fit says while that improves it. They differ in what admits a
    move: make_q3 asks Σwxl > 0 before and Σwl² > 0 after it, make_qp both before; and
    make_qp's levels are uint8 (a negative one wraps). Returns the sums Σwxl, Σwl²."""
    wx = w * x
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            ok = slx > 0 if q3 else (slx > 0) & (sl2 > 0)
            new = nearest_int(x[i] * sl2 / slx).clamp_(lo, hi)
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if q3:
                take &= sl2 > 0
            L[i] = torch.where(take, new if q3 else u8(new), li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):  # a pass that changes nothing would repeat itself
            break
    return sumlx, suml2


def u8(v: torch.Tensor) -> torch.Tensor:
    """C's int → uint8_t (the low byte), kept as float32 as the searches hold levels."""
    return (v.to(torch.int32) & 0xFF).to(torch.float32)


def make_qp(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants (the K-quants' sub-block scales and minimums with an importance
    matrix), ``x`` and weights ``qw`` [n, N]: the best of nine scales, then up to five passes
    moving one level at a time. Returns (scale [N], L [n, N] as uint8 values)."""
    mx = x.amax(0)
    zero = ~(mx >= GROUP_MAX_EPS)  # ggml's max starts at 0: all ≤ 0 is "all zero"
    iscale = div_once(nmax, mx)

    def mse(isc: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = x - div_once(1.0, isc) * lv
        return seq_sum(qw * diff * diff)

    best = mse(iscale, u8(nearest_int(iscale * x)))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = div_once(f32(f32(f32(0.1) * step) + nmax), mx)
        err = mse(isc, nearest_int(isc * x).clamp_(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, isc, iscale)
    lv = nearest_int(iscale * x).clamp_(max=nmax)
    L = u8(lv)
    sumlx, suml2 = seq_sum(qw * x * lv), seq_sum(qw * lv * lv)
    sumlx, suml2 = _refine(x, qw, L, sumlx, suml2, None, nmax, q3=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, L)
