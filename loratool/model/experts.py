"""Mixture-of-experts factors as tensors: PEFT's layout of rank r·E converted to one factor
pair per expert (A [E, r, in], B [E, out, r]) and back, and an experts module taken apart into
one linear module per expert (what combine and resize work on) and put back together. The
names and shapes of experts are ``loratool.headers.moe``.

Example::

    A3, B3 = from_peft(A, B, experts=8)
"""

from __future__ import annotations

import copy
import re

import torch

from ..errors import FormatError
from .adapter import LoraAdapter, LoraModule


def from_peft(A: torch.Tensor, B: torch.Tensor, experts: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's A [r·E, in], B [out, r·E] → A [E, r, in], B [E, out, r] (contiguous copies)."""
    if A.shape[0] % experts or B.shape[1] != A.shape[0]:
        raise FormatError(f"expert factors A {list(A.shape)} and B {list(B.shape)} do not "
                          f"split into {experts} experts")
    r = A.shape[0] // experts
    return (A.reshape(experts, r, A.shape[1]).contiguous(),
            B.reshape(B.shape[0], r, experts).permute(2, 0, 1).contiguous())


def to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E, r, in], B [E, out, r] → PEFT's A [r·E, in], B [out, r·E]."""
    E, r, n = A.shape
    return (A.reshape(E * r, n).contiguous(),
            B.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous())


EXPERT_KEY = re.compile(r"^(?P<name>.+)\[(?P<e>\d+)\]$")


def explode(ad: LoraAdapter) -> tuple[LoraAdapter, dict[str, tuple[str, int]]]:
    """A copy of ``ad`` with each experts module as E linear modules ``name[e]`` (what
    combine and resize work on), and each exploded module's layout, to :func:`implode` by."""

    out = copy.copy(ad)
    out.modules = {}
    layouts = {}
    for key, m in ad.modules.items():
        if not m.experts:
            out.modules[key] = m
            continue
        layouts[key] = (m.layout, m.experts)
        for e in range(m.experts):
            x = m.expert(e)
            x.layout = "linear"  # [out, in] factors; the orientation comes back on implode
            out.modules[f"{key}[{e}]"] = x
    return out, layouts


def implode(ad: LoraAdapter, layouts: dict[str, tuple[str, int]]) -> None:
    """Put the ``name[e]`` modules of ``ad`` back together as experts modules, in place. The
    experts of a parameter share one rank (PEFT stores r·E), the largest any needs: the
    others get zero components, which change nothing; a scale other than 1 is folded into B."""

    groups: dict[str, dict[int, LoraModule]] = {}
    for key in list(ad.modules):
        m = EXPERT_KEY.match(key)
        if m is not None and m.group("name") in layouts:
            groups.setdefault(m.group("name"), {})[int(m.group("e"))] = ad.modules.pop(key)
    for key, members in groups.items():
        layout, E = layouts[key]
        r = max(x.rank for x in members.values())
        first = next(iter(members.values()))
        n_in, n_out = first.A.shape[1], first.B.shape[0]
        dtype = first.A.dtype
        A = torch.zeros(E, r, n_in, dtype=dtype)
        B = torch.zeros(E, n_out, r, dtype=dtype)
        for e, x in members.items():
            b = x.B if x.scale == 1.0 else (x.B.float() * x.scale).to(dtype)
            A[e, : x.rank], B[e, :, : x.rank] = x.A, b
        ad.add(LoraModule(key, A, B, float(r), False, layout, component=first.component))
