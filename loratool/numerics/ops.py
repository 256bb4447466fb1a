"""Pure torch math: the dense delta of a LoRA module in the base tensor's layout, low-rank
factorisations and their errors, budgets, and the elementwise merges (TIES, DARE).

It imports torch and the report type it fills (``SpectrumMeasures``), nothing that reads or
writes files. Formulas follow PEFT exactly (``(B @ A) * scale``, transposed
for fan_in_fan_out and embeddings), so that a merge computed from them is bit for bit PEFT's.
"""

from __future__ import annotations

import heapq
import math

import torch

from ..reports.analyze import SpectrumMeasures

# experts: fused mixture-of-experts parameters, [E, out, in] (experts_t: [E, in, out]), with
# per-expert factors A [E, r, in], B [E, out, r] (see headers/moe.py, model/experts.py)
LAYOUTS = ("linear", "fan_in_fan_out", "embedding", "conv", "experts", "experts_t")


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, layout: str,
               out: torch.Tensor | None = None, scaled: bool = True) -> torch.Tensor:
    """ΔW for one module in the base weight's layout, computed in A's dtype.

    linear: (B@A)·s [out, in]; fan_in_fan_out and embedding: (B@A)ᵀ·s; experts: B[e]@A[e]·s
    per expert [E, out, in] (experts_t: each transposed); conv:
    (B.view(out, r) @ A.view(r, -1)).view(out, in, *kernel)·s. ``out``: a reused buffer of at
    least that many elements (the same matmul, written in place). ``scaled=False`` leaves the
    multiplication by the scale to the caller (the same product, applied later).
    """
    def mm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if out is None:
            return b @ a
        return torch.matmul(b, a, out=out[: b.shape[0] * a.shape[1]].view(b.shape[0],
                                                                           a.shape[1]))

    if layout == "conv":
        rows, r = B.shape[0], B.shape[1]
        if B.dim() > 2 and math.prod(B.shape[2:]) != 1:
            raise ValueError("conv lora_B must have a 1×1 kernel")
        d = mm(B.reshape(rows, r), A.reshape(A.shape[0], -1))
        return (d.mul_(scale) if scaled else d).reshape(rows, *A.shape[1:])
    if layout in ("experts", "experts_t"):
        # one product per expert (bmm: the bits of PEFT's einsum over experts)
        d = torch.bmm(B, A)
        d = d.transpose(1, 2) if layout == "experts_t" else d
        return d.mul_(scale) if scaled else d
    d = mm(B, A)
    if layout in ("fan_in_fan_out", "embedding"):
        d = d.T
    return d.mul_(scale) if scaled else d  # in place on the fresh product: same as d * scale


def base_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layout: str
               ) -> tuple[int, ...]:
    """The shape of the base weight a module with these factor shapes applies to."""
    if layout == "conv":
        return (b_shape[0], *a_shape[1:])
    if layout == "experts":
        return (a_shape[0], b_shape[1], a_shape[2])
    if layout == "experts_t":
        return (a_shape[0], a_shape[2], b_shape[1])
    if layout in ("fan_in_fan_out", "embedding"):
        return (a_shape[1], b_shape[0])
    return (b_shape[0], a_shape[1])


def dora_merge(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, layout: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA merge as PEFT does it: V = W + ΔW, W' = (m / ‖V‖) · V with the norm over the input
    dimension of each output row. Returns W' and ‖V‖ (needed to undo the merge)."""
    if layout == "conv":
        v = W + 1 * delta
        norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)
        factor = (magnitude.reshape(1, -1, *[1] * (v.dim() - 2)) / norm).transpose(1, 0)
        return factor * (W + delta), norm.reshape(-1)
    fan = layout == "fan_in_fan_out"
    v = (W.T if fan else W) + 1 * (delta.T if fan else delta)
    norm = torch.linalg.norm(v, dim=1).to(v.dtype)
    factor = (magnitude / norm).view(-1, 1)
    if fan:
        factor = factor.T
    return factor * (W + delta), norm


def dora_unmerge(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                 norm: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`dora_merge` given the recorded ‖V‖: W = W' / (m / ‖V‖) − ΔW."""
    factor = magnitude.reshape(-1) / norm.reshape(-1)
    if layout == "conv":
        factor = factor.reshape(-1, *[1] * (W.dim() - 1))
    else:
        factor = factor.view(-1, 1)
        if layout == "fan_in_fan_out":
            factor = factor.T
    return W / factor - delta


def lora_abs_delta(A: torch.Tensor, B: torch.Tensor, scale: float, layout: str) -> torch.Tensor:
    """|scale|·(|B| @ |A|) in the base layout: a bound on |ΔW| used for rounding-error bounds."""
    return lora_delta(A.abs(), B.abs(), abs(scale), layout)


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               t1: torch.Tensor | None, t2: torch.Tensor | None, scale: float) -> torch.Tensor:
    """LyCORIS LoHa: ΔW = ((w1a@w1b) ⊙ (w2a@w2b))·scale, flat [out, in·k] for a conv; with
    Tucker cores t1, t2 [r, r, *k] each half is t ×₁ w_a ×₂ w_b, shaped [out, in, *k]. The
    operations and their order are LyCORIS' own, so float32 results agree with its bits."""
    if t1 is not None and t2 is not None:
        h1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, w1b, w1a)
        h2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2b, w2a)
    else:
        h1 = w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)
        h2 = w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)
    return (h1 * h2) * scale


def lokr_delta(w1: torch.Tensor | None, w1a: torch.Tensor | None, w1b: torch.Tensor | None,
               w2: torch.Tensor | None, w2a: torch.Tensor | None, w2b: torch.Tensor | None,
               t2: torch.Tensor | None, scale: float) -> torch.Tensor:
    """LyCORIS LoKr: ΔW = kron(w1, w2)·scale, each side given whole or as a product
    (w1a@w1b; w2a@w2b, or the Tucker form t2 ×₁ w2a ×₂ w2b for a conv)."""
    if w1 is None:
        w1 = w1a @ w1b  # type: ignore[operator]
    if w2 is None:
        if t2 is None:
            r, o, *k = w2b.shape  # type: ignore[union-attr]
            w2 = (w2a @ w2b.reshape(r, -1)).reshape(-1, o, *k)  # type: ignore[operator,union-attr]
        else:
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", t2, w2a, w2b)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    d = torch.kron(w1, w2.contiguous())
    return d * scale if scale != 1 else d


def tucker_fold(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker LoCon's mid [r, r, *k] and down [r, in, 1, 1] as one conv down factor
    [r, in, *k]: B@(mid ×₂ down) is the same ΔW, so the module is plain LoRA of rank r."""
    return torch.einsum("i j ..., j c -> i c ...", mid, down.reshape(down.shape[0], -1))


def mantissa_bits(dtype: torch.dtype) -> int:
    """Significand bits (with the implicit one) of a float dtype: fp32 24, bf16 8, fp16 11."""
    return 1 - int(math.log2(torch.finfo(dtype).eps))


# --------------------------------------------------------------------------- low-rank factors

def randomized_svd(M: torch.Tensor, k: int, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | None = None, tol: float = 0.0,
                   total_sq: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k + oversample`` singular triplets of M (Halko, Martinsson & Tropp 2011):
    a Gaussian range finder with QR-stabilised power iterations, then an exact SVD of the
    small projected matrix. Returns U [m, l], S [l], Vh [l, n] with l ≤ min(m, n).

    Every pass over M gives an approximation: after Mᵀ·Q the left projection Q·Qᵀ·M (its SVD
    from the QR of Mᵀ·Q), after M·P the right projection M·P·Pᵀ (from the SVD of M·P). Each
    is an orthogonal projection of M, so for any j ≤ l the rank-j truncation has error²
    exactly ‖M‖² − Σ_{i≤j} S_i². With ``tol`` and ``total_sq`` (‖M‖²) the iteration stops
    once a pass lowers the rank-k error by less than ``tol`` of itself: a clear gap in the
    spectrum converges after two or three passes, not the six of ``power_iters=2``.
    """
    m, n = M.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega).Q
    prev = None
    for h in range(2 * power_iters + 1):
        if h % 2 == 0:  # Qᵀ·M = (Mᵀ·Q)ᵀ = Rᵀ·Pᵀ
            P, R = torch.linalg.qr(M.T @ Q)
            Ur, S, Vrh = torch.linalg.svd(R.T)
            U, Vh = Q @ Ur, Vrh @ P.T
        else:  # M·P·Pᵀ, whose left basis starts the next pass
            U, S, Wh = torch.linalg.svd(M @ P, full_matrices=False)
            Vh, Q = Wh @ P.T, U
        if tol and total_sq:
            err = math.sqrt(max(total_sq - float((S[:k].double() ** 2).sum()), 0.0))
            if prev is not None and prev - err <= tol * err:
                break
            prev = err
    return U, S, Vh


def exact_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full (thin) SVD."""
    return torch.linalg.svd(M, full_matrices=False)


def rank_for_energy(S: torch.Tensor, total_sq: float, fraction: float) -> int | None:
    """Smallest k with Σ_{i≤k} S_i² ≥ fraction·total_sq; None when these S do not reach it."""
    if total_sq == 0.0:
        return 0
    cum = torch.cumsum(S.double() ** 2, 0)
    hit = torch.nonzero(cum >= fraction * total_sq)
    return int(hit[0]) + 1 if hit.numel() else None


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_k·√S_k [m, k], A = √S_k·Vh_k [k, n]: both factors of similar magnitude, which
    bf16 and fp16 storage prefer (kohya puts all of S in B, mergekit splits it as here)."""
    r = S[:k].sqrt()
    return U[:, :k] * r, r[:, None] * Vh[:k]


def sum_squares(M: torch.Tensor) -> float:
    """‖M‖²_F: float32 norms of the rows (torch's cascade summation keeps each within a few
    ulps), summed in float64. As accurate as the float32 singular values it is compared with,
    and 30× faster than converting M to float64 (no copy of M either)."""
    rows = M.reshape(M.shape[0], -1) if M.dim() > 1 else M.reshape(1, -1)
    return float(torch.linalg.vector_norm(rows.float(), dim=1).double().square().sum())


def residual_norm(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                  rows: int = 1024) -> float:
    """‖M − B@A‖_F computed in blocks of rows (float32 products and row norms, float64
    sums): the measured error of the factors as stored, not an estimate."""
    if M.device.type == "cpu":  # 1 MiB blocks stay in cache (a GPU wants fewer, larger ones)
        rows = max(1, min(rows, (1 << 18) // max(1, M.shape[1])))
    buf = torch.empty(rows * M.shape[1], dtype=M.dtype, device=M.device)
    total = 0.0
    for s in range(0, M.shape[0], rows):
        e = min(s + rows, M.shape[0])
        R = torch.addmm(M[s:e], B[s:e], A, alpha=-1, out=buf[: (e - s) * M.shape[1]].view(
            e - s, M.shape[1]))
        total += sum_squares(R)
    return math.sqrt(total)


def allocate_budget(spectra: list[torch.Tensor], costs: list[int], budget: int,
                    caps: list[int]) -> list[int]:
    """Ranks that minimise Σ residual² under Σ rank·cost ≤ budget: take rank-one components
    greedily by σ² per parameter. Within a module σ² does not increase, so every module's next
    component is its best, and the greedy choice is optimal up to the last, partly fitting
    component (the classic fractional-knapsack argument)."""

    ranks = [0] * len(spectra)
    heap = [(-float(s[0]) ** 2 / c, j) for j, (s, c) in enumerate(zip(spectra, costs))
            if len(s) and caps[j] > 0]
    heapq.heapify(heap)
    left = budget
    while heap:
        _, j = heapq.heappop(heap)
        if costs[j] > left:
            continue  # does not fit; a cheaper module's component may still
        left -= costs[j]
        ranks[j] += 1
        if ranks[j] < min(len(spectra[j]), caps[j]):
            heapq.heappush(heap, (-float(spectra[j][ranks[j]]) ** 2 / costs[j], j))
    return ranks


# --------------------------------------------------------------------------- combining adapters

def factored_svd(B: torch.Tensor, A: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B@A without forming it: B = Q_B R_B, Aᵀ = Q_A R_A, R_B R_Aᵀ = U' S V'ᵀ, so
    B@A = (Q_B U') S (Q_A V')ᵀ. Float64 for the small core keeps the spectrum exact enough to
    read errors from it."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.T.double())
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return (qb @ u).float(), s, (vh @ qa.T).float()


def trim(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (TIES 'trim')."""
    k = int(math.ceil(density * d.numel()))
    if k >= d.numel():
        return d
    if k == 0:
        return torch.zeros_like(d)
    thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values
    return torch.where(d.abs() >= thresh, d, torch.zeros_like(d))


def dare(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the rest by 1/density."""
    keep = torch.rand(d.shape, generator=gen, dtype=torch.float32) < density
    return torch.where(keep, d / density, torch.zeros_like(d))


def ties_merge(ds: list[torch.Tensor]) -> torch.Tensor:
    """TIES elect + disjoint merge: the sign of Σ τ̂ᵢ per entry, then the mean of the entries
    that agree with it (zeros do not vote and are not averaged)."""
    stack = torch.stack(ds)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (stack * agree).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def factored_residual(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor,
                      A2: torch.Tensor) -> float:
    """‖B1·A1 − B2·A2‖_F without forming either product: with [B1, −B2] = Q_L·R_L and
    [A1; A2]ᵀ = Q_R·R_R, the difference is Q_L·(R_L·R_Rᵀ)·Q_Rᵀ and has the core's norm."""
    left = torch.cat([B1.double(), -B2.double()], 1)
    right = torch.cat([A1.double(), A2.double()], 0)
    rl = torch.linalg.qr(left).R
    rr = torch.linalg.qr(right.T).R
    return float(torch.linalg.matrix_norm(rl @ rr.T))


def product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F in float64, by the cheaper of two exact ways: the product itself (out·in·r
    operations), or two Gram matrices of the rank's size, ‖BA‖² = Σᵢⱼ (BᵀB)ᵢⱼ (AAᵀ)ᵢⱼ
    (r²·(out + in)), which never forms an [out, in] matrix."""
    B, A = B.double(), A.double()
    (out, r), n = B.shape, A.shape[1]
    if out * n * r <= r * r * (out + n):
        return float(torch.linalg.matrix_norm(B @ A))
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


# --------------------------------------------------------------------------- analysis

def error_curve(S: torch.Tensor, total_sq: float) -> list[float]:
    """Eckart–Young: the relative error of the best rank-r approximation,
    sqrt(Σ_{i>r} σ²ᵢ)/‖M‖ = sqrt(‖M‖² − Σ_{i≤r} σ²ᵢ)/‖M‖, for r = 0 … len(S), from the leading
    singular values and the exact ‖M‖²: the tail's mass is known without a full SVD."""
    if total_sq == 0.0:
        return [0.0] * (len(S) + 1)
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(S.double() ** 2, 0)])
    return [math.sqrt(max(total_sq - float(k), 0.0) / total_sq) for k in kept]


def subspace_similarity(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """The LoRA paper's φ(i, j) = ‖V1[:i] V2[:j]ᵀ‖²_F / min(i, j) for every i ≤ len(V1),
    j ≤ len(V2), from orthonormal rows (right-singular vectors, strongest first): a grid in
    [0, 1], 1 where one subspace contains the other."""
    C = (V1.double() @ V2.double().T) ** 2
    cum = torch.cumsum(torch.cumsum(C, 0), 1)
    i = torch.arange(1, C.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, C.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def amplification(delta_norm: float, W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor
                  ) -> float | None:
    """The LoRA paper's amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F: how much ΔW amplifies the
    directions U, V (r columns / rows) compared with how strongly W already holds them; None
    where W holds none of them (an all-zero base weight): the ratio has no meaning there."""
    held = float(torch.linalg.matrix_norm(U.T.to(W.dtype) @ W @ Vh.T.to(W.dtype),
                                          dtype=torch.float64))
    return delta_norm / held if held else None


def spectrum_measures(S: torch.Tensor, total_sq: float, energies: tuple[float, ...],
                      shown: int = 64) -> SpectrumMeasures:
    """What a spectrum says, as ``analyze`` and ``extract --report`` give it: the leading
    singular values, the rank that keeps each fraction of ‖M‖² (None where these values do not
    reach it), and the Eckart–Young error of every rank they cover."""
    return SpectrumMeasures(
        singular_values=[float(x) for x in S[:shown]],
        computed=len(S),
        captured_energy=float((S.double() ** 2).sum()) / total_sq if total_sq else 1.0,
        effective_rank={f"{e:g}": rank_for_energy(S, total_sq, e - 1e-12) for e in energies},
        error_curve=error_curve(S[:shown], total_sq))
