"""The rotation matrices of PEFT's OFT and BOFT, computed with PEFT's own operations in PEFT's
order (``peft/tuners/oft/layer.py``, ``peft/tuners/boft/layer.py``), so that float32 results
agree with ``merge_and_unload()`` bit for bit; and their exact inverses (float64), for unmerge.

OFT: each block's skew-symmetric Q (from its b(b−1)/2 stored values) → R by the Cayley map,
(I − Q)(I + Q)⁻¹ by a solve, or by PEFT's truncated Neumann series I + 2Q + 2Q² + … + Qⁿ⁻¹
(an approximation PEFT trains with: R is then only nearly orthogonal); R is block-diagonal.
BOFT: blocks by the Cayley map of ½(X − Xᵀ), in butterfly factors Pᵢ·diag(Rᵢ)·Pᵢᵀ multiplied
together; PEFT on the CPU trains one factor (P = I).

Example::
    R = oft_matrix(weight, {"use_cayley_neumann": True, "num_cayley_neumann_terms": 5}, 64)
    W_merged = torch.mm(R, W.t()).t()
"""

from __future__ import annotations

import math
from typing import Mapping

import torch


def oft_block_size(n_elements: int) -> int:
    """b from the b(b−1)/2 values of a block's upper triangle."""
    return int(round((1 + math.sqrt(1 + 8 * n_elements)) / 2))


def oft_fits(shape: torch.Size | tuple[int, ...], n_in: int, settings: Mapping[str, object]
             ) -> bool:
    """Whether OFT's ``[blocks, b(b−1)/2]`` rotates a layer of ``n_in`` inputs."""
    b = oft_block_size(int(shape[1]))
    if b * (b - 1) // 2 != shape[1] or not b or n_in % b:
        return False
    return bool(settings.get("block_share")) and shape[0] == 1 or shape[0] * b == n_in


def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """PEFT's ``_pytorch_skew_symmetric``."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    m = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def _project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """PEFT's ``_project_batch`` (constrained OFT): each block's Q kept within eps of 0."""
    Q = _skew(vec, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(Q.shape[0]))
    zero = torch.zeros((Q.size(1), Q.size(1)), device=Q.device, dtype=Q.dtype
                       ).unsqueeze(0).expand_as(Q)
    diff = Q - zero
    norm = torch.norm(Q - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm <= eps).bool(), Q, zero + eps * (diff / norm))
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    return out[:, rows, cols]


def _cayley(vec: torch.Tensor, b: int, neumann: bool, terms: int, abs_: bool = False
            ) -> torch.Tensor:
    """PEFT's ``_cayley_batch``; ``abs_``: the series of |Q| (a bound for rounding)."""
    n = vec.shape[0]
    Q = _skew(vec, b)
    if abs_:
        Q = Q.abs()
    if neumann:
        R = torch.eye(b, device=vec.device, dtype=vec.dtype).repeat(n, 1, 1)
        if terms > 1:
            R.add_(Q, alpha=2.0)
            if terms > 2:
                Q2 = torch.bmm(Q, Q)
                R.add_(Q2, alpha=2.0)
                Qp = Q2
                for _ in range(3, terms - 1):
                    Qp = torch.bmm(Qp, Q)
                    R.add_(Qp, alpha=2.0)
                Qp = torch.bmm(Qp, Q)
                R.add_(Qp)
        return R
    eye = torch.eye(b, device=vec.device, dtype=vec.dtype).unsqueeze(0).expand(n, b, b)
    R = torch.linalg.solve(eye + Q, eye - Q, left=False)
    return R.abs() if abs_ else R


def oft_matrix(weight: torch.Tensor, settings: Mapping[str, object], n_in: int,
               inverse: bool = False, abs_: bool = False) -> torch.Tensor:
    """OFT's [n_in, n_in] block-diagonal rotation as PEFT's ``get_delta_weight`` computes it
    in ``weight``'s dtype (``inverse``: each block inverted in float64, then cast back)."""
    b = oft_block_size(int(weight.shape[1]))
    if settings.get("coft"):
        weight = _project(weight, b, float(settings.get("eps", 6e-5)))  # type: ignore[arg-type]
    R = _cayley(weight, b, bool(settings.get("use_cayley_neumann", True)),
                int(settings.get("num_cayley_neumann_terms", 5)), abs_)  # type: ignore
    if inverse:
        R = torch.linalg.inv(R.double()).to(weight.dtype)
    blocks = n_in // b
    return torch.block_diag(*([R[0]] * blocks if R.shape[0] == 1 else list(R)))


def butterfly_perm(n: int, b: int, r: int, factor: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm``: the permutation of factor ``factor`` (0: identity)."""
    if factor == 0:
        return torch.arange(n)
    block = n // b
    step = block / r
    initial = torch.arange(block)
    order = torch.empty(block, dtype=torch.long)
    seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(seq):
        order[int(i * r):int(i * r + r)] = initial[int(pos * r):int(pos * r + r)]
    idx = torch.arange(n)
    for i in range(0, n, block):
        idx[i:i + block] = idx[i:i + block][order]
    return idx


def boft_matrix(boft_R: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """BOFT's [n_in, n_in] butterfly rotation: PEFT's ``cayley_batch`` on every block, block
    diagonals, each conjugated by its butterfly permutation (an exact reindexing: PEFT's
    multiplication by a permutation matrix gives the same values), the factors multiplied in
    PEFT's order. ``inverse``: each block inverted in float64, the factors in reverse."""
    N, D, H, _ = boft_R.shape
    data = boft_R.reshape(N * D, H, H)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(H, device=data.device, dtype=data.dtype).unsqueeze(0).expand(N * D, H, H)
    blocks = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(N, D, H, H)
    if inverse:
        blocks = torch.linalg.inv(blocks.double()).to(boft_R.dtype)
    n = D * H
    mats = []
    for i in range(N):
        perm = butterfly_perm(n, int(D / 2 ** i), int(H / 2), N - 1)
        mats.append(torch.block_diag(*torch.unbind(blocks[i]))[perm][:, perm])
    M = mats[-1] if inverse else mats[0]
    for i in (range(N - 2, -1, -1) if inverse else range(1, N)):
        M = mats[i] @ M
    return M
