"""analyze: each measure against its definition computed densely in float64 in the test, on
planted structure; the pictures and the page, produced headless and opened."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from loratool.formats import peft
from loratool.model.adapter import LoraAdapter, LoraModule

K = 6  # the planted rank


def _planted(d: Path, noise: float = 1e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A base and a tuned checkpoint: each matrix changed by a rank-K update with singular
    values from 1 to 0.5 (every one of them carries > 1 % of the energy) plus tiny noise."""
    g = torch.Generator().manual_seed(seed)
    base, tuned, deltas = {}, {}, {}
    for i, (o, n) in enumerate([(48, 40), (64, 64), (40, 96)]):
        W = torch.randn(o, n, generator=g, dtype=torch.float64)
        U = torch.linalg.qr(torch.randn(o, K, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, K, generator=g, dtype=torch.float64)).Q
        s = torch.linspace(1.0, 0.5, K, dtype=torch.float64)
        D = (U * s) @ V.T
        N = torch.randn(o, n, generator=g, dtype=torch.float64)
        D = D + N * (noise * D.norm() / N.norm())
        name = f"layers.{i}.proj.weight"
        base[name], tuned[name] = W.float(), (W + D).float()
        deltas[name] = tuned[name].double() - base[name].double()  # as stored
    for folder, sd in (("base", base), ("tuned", tuned)):
        (d / folder).mkdir(parents=True)
        save_file(sd, d / folder / "model.safetensors")
    return {**deltas, **{"W:" + k: v.double() for k, v in base.items()}}


def _analysis(d: Path, *args: object) -> dict:
    res = run_cli("analyze", *args, "--json")
    assert res.rc == 0, res.err
    return json.loads(res.out)


def test_planted_rank_spectrum_and_error_curve(tmp_path):
    dense = _planted(tmp_path)
    rep = _analysis(tmp_path, tmp_path / "base", tmp_path / "tuned")
    assert rep["mode"] == "finetune" and len(rep["modules"]) == 3
    for m in rep["modules"]:
        D = dense[m["tensor"]]
        s = torch.linalg.svdvals(D)
        total = float((s ** 2).sum())
        assert m["effective_rank"]["0.99"] == K, m["effective_rank"]
        assert math.isclose(m["delta_norm"], math.sqrt(total), rel_tol=1e-6)
        # Eckart–Young: the error of rank r is sqrt(Σ_{i>r} σ²)/‖ΔW‖, at every r computed, up
        # to the float32 rounding of the energies (~1e-7 of ‖ΔW‖²: it shows only at the floor)
        for r, err in enumerate(m["error_curve"]):
            want = math.sqrt(float((s[r:] ** 2).sum()) / total)
            assert abs(err ** 2 - want ** 2) <= 1e-6, (r, err, want)
        for got, want in zip(m["singular_values"], s):
            assert math.isclose(got, float(want), rel_tol=1e-4, abs_tol=1e-6)
    assert rep["suggest"]["command"].endswith("--energy 0.9")


def test_the_suggested_extract_gives_the_ranks_and_parameters_it_names(tmp_path, tiny_llama):
    import shlex

    from conftest import finetuned

    tiny_llama.save_pretrained(tmp_path / "base")
    finetuned(tiny_llama, rank=3, noise=0.01).save_pretrained(tmp_path / "tuned")
    rep = _analysis(tmp_path, tmp_path / "base", tmp_path / "tuned")
    s = rep["suggest"]
    assert "--embed-lora" in s["command"]  # the changed embedding rows are a matrix here too
    args = [a.replace("ADAPTER", str(tmp_path / "ad")) for a in shlex.split(s["command"])[1:]]
    res = run_cli(*args, "--json")
    assert res.rc == 0, res.err
    ext = json.loads(res.out)
    ranks = {m["name"]: m["rank"] for m in ext["modules"]}
    for m in rep["modules"]:  # the same rank per module, and the same count of factor values
        assert ranks[m["name"]] == m["effective_rank"]["0.9"], m["name"]
    assert [min(ranks.values()), max(ranks.values())] == s["ranks"]
    factors = sum(r * (m["shape"][0] + math.prod(m["shape"][1:]))
                  for m in ext["modules"] for r in [m["rank"]])
    assert factors == s["parameters"]


def test_amplification_matches_its_dense_definition(tmp_path):
    dense = _planted(tmp_path)
    rep = _analysis(tmp_path, tmp_path / "base", tmp_path / "tuned", "--rank", "4")
    for m in rep["modules"]:
        D, W = dense[m["tensor"]], dense["W:" + m["tensor"]]
        U, _, Vh = torch.linalg.svd(D, full_matrices=False)
        r = m["amplification"]["rank"]
        assert r == 4
        want = float(D.norm() / (U[:, :r].T @ W @ Vh[:r].T).norm())
        assert math.isclose(m["amplification"]["factor"], want, rel_tol=1e-6), (
            m["amplification"]["factor"], want)
        assert m["amplification"]["random"] > 0


def _adapter(path: Path, dims: int, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    ad = LoraAdapter(source_format="peft")
    for i in range(4):
        ad.add(LoraModule(f"layers.{i}.proj", torch.randn(rank, dims, generator=g),
                          torch.randn(dims, rank, generator=g), float(rank)))
    return peft.write(ad, path)


def test_subspace_similarity_of_itself_and_of_random_subspaces(tmp_path):
    a = _adapter(tmp_path / "a", 256, 32, 0)
    b = _adapter(tmp_path / "b", 256, 32, 1)
    rep = _analysis(tmp_path, "--compare", a, a)
    for m in rep["modules"]:
        assert all(abs(p - 1.0) < 1e-9 for p in m["phi_diagonal"])  # φ(i, i) = 1
    rep = _analysis(tmp_path, "--compare", a, b)
    # independent random subspaces: E φ(i, j) = j/d for i ≤ j
    for i, j in ((8, 32), (16, 16), (32, 32), (4, 24)):
        got = sum(m["phi"][i - 1][j - 1] for m in rep["modules"]) / len(rep["modules"])
        assert abs(got - j / 256) < 0.25 * j / 256, (i, j, got)


def test_similarity_is_the_papers_definition_and_delta_ignores_the_split(tmp_path):
    from loratool.formats import read_adapter

    a = _adapter(tmp_path / "a", 96, 8, 3)
    ad = read_adapter(str(a))
    g = torch.Generator().manual_seed(9)
    split = LoraAdapter(source_format="peft")  # the same ΔW, split differently: B·R, R⁻¹·A
    for key, m in ad.modules.items():
        R = torch.randn(8, 8, generator=g, dtype=torch.float64) + 4 * torch.eye(8)
        split.add(LoraModule(key, (torch.linalg.inv(R) @ m.A.double()).float(),
                             (m.B.double() @ R).float(), m.alpha))
    b = peft.write(split, tmp_path / "b")
    paper = _analysis(tmp_path, "--compare", a, b)
    for m in paper["modules"]:  # φ from the A factors' SVDs, densely, in float64
        V = [torch.linalg.svd(x.modules[m["name"]].A.double(), full_matrices=False).Vh
             for x in (ad, read_adapter(str(b)))]
        for i, j in ((1, 1), (2, 5), (8, 3), (8, 8)):
            want = float((V[0][:i] @ V[1][:j].T).norm() ** 2) / min(i, j)
            assert math.isclose(m["phi"][i - 1][j - 1], want, rel_tol=1e-6, abs_tol=1e-7)
    assert min(m["phi_diagonal"][0] for m in paper["modules"]) < 0.9  # A's own split shows
    delta = _analysis(tmp_path, "--compare", a, b, "--subspace", "delta")
    assert delta["subspace"] == "delta"
    for m in delta["modules"]:  # ΔW's directions do not depend on the split
        assert all(abs(p - 1.0) < 1e-4 for p in m["phi_diagonal"]), m["phi_diagonal"]


def test_an_adapter_from_its_factors(tmp_path):
    a = _adapter(tmp_path / "a", 64, 8, 2)
    ad = __import__("loratool.formats", fromlist=["read_adapter"]).read_adapter(str(a))
    rep = _analysis(tmp_path, a)
    for m in rep["modules"]:
        s = torch.linalg.svdvals(ad.modules[m["name"]].delta(torch.float64))
        assert all(math.isclose(x, float(y), rel_tol=1e-5) for x, y in zip(
            m["singular_values"], s[:8]))
        assert m["amplification"] is None  # no --base: no W
    assert _analysis(tmp_path, a, "--target", "layers.1.*")["modules"][0]["name"] == \
        "layers.1.proj"


def test_pictures_and_a_self_contained_page(tmp_path):
    import re

    from PIL import Image

    _planted(tmp_path)
    res = run_cli("analyze", tmp_path / "base", tmp_path / "tuned", "--plot", tmp_path / "p",
                  "--html", tmp_path / "a.html")
    assert res.rc == 0, res.err
    pngs = sorted((tmp_path / "p").glob("*.png"))
    assert {p.name.split("-")[0] for p in pngs} == {"spectra", "errors"}
    for p in pngs:
        with Image.open(p) as im:
            im.verify()  # a real PNG
    page = (tmp_path / "a.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    refs = re.findall(r"(?:src|href)\s*=\s*['\"]([^'\"]+)", page)
    assert refs and all(r.startswith("data:") for r in refs)  # nothing outside the page
    assert "http" not in page and "<script" not in page and "<link" not in page
    a = _adapter(tmp_path / "ad", 64, 8, 3)
    res = run_cli("analyze", "--compare", a, a, "--plot", tmp_path / "s")
    assert res.rc == 0 and [p.name for p in (tmp_path / "s").glob("*.png")] == [
        "similarity-layers.N.proj.png"]


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    _planted(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = run_cli("analyze", tmp_path / "base", tmp_path / "tuned", "--plot", tmp_path / "p")
    assert res.rc == 1 and "loratool[plot]" in res.err and not (tmp_path / "p").exists()


def test_extract_report_carries_the_same_measures(tmp_path):
    _planted(tmp_path)
    rep = _analysis(tmp_path, tmp_path / "base", tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "x",
                  "--rank", "8", "--json")
    assert res.rc == 0, res.err
    ex = {m["tensor"]: m["analysis"] for m in json.loads(res.out)["modules"]}
    for m in rep["modules"]:
        assert ex[m["tensor"]]["effective_rank"]["0.99"] == m["effective_rank"]["0.99"] == K


def test_bad_requests(tmp_path):
    a = _adapter(tmp_path / "a", 16, 2, 0)
    for args, code, says in ((["--compare", a], 2, "two adapters"),
                             ([a, a, a], 2, "BASE TUNED"),
                             ([a, "--energy", "0"], 2, "--energy")):
        res = run_cli("analyze", *args)
        assert res.rc == code and says in res.err, res


@pytest.mark.parametrize("noise", [0.0])
def test_exactly_low_rank_has_zero_tail(tmp_path, noise):
    _planted(tmp_path, noise=noise)
    rep = _analysis(tmp_path, tmp_path / "base", tmp_path / "tuned")
    for m in rep["modules"]:
        assert m["error_curve"][K] < 1e-3  # float32 storage of the models is all that is left
