"""Promises kept: budgets that hold whatever the inputs, ranks and notes that say what was
written, messages whose advice is possible and sufficient, and one CLI grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.formats import peft, read_adapter
from loratool.model.adapter import LoraAdapter, LoraModule

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _written(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of every tensor in the adapter's weights file, read by the
    safetensors library itself."""
    from safetensors import safe_open

    f = path / "adapter_model.safetensors" if path.is_dir() else path
    params = nbytes = 0
    with safe_open(str(f), "pt") as s:
        for k in s.keys():
            t = s.get_tensor(k)
            params += t.numel()
            nbytes += t.numel() * t.element_size()
    return params, nbytes


def _within(res, out: Path, budget: str) -> None:
    """A budget run either fits or says, in one line, why it cannot."""
    if res.rc == 1:
        assert len(res.err.strip().splitlines()) == 1 and "--budget" in res.err, res.err
        assert not out.exists()
        return
    assert res.rc == 0, res.err
    params, nbytes = _written(out)
    if budget.isdigit():
        assert params <= int(budget), (params, budget)
    else:
        from loratool.units import parse_size

        assert nbytes <= parse_size(budget), (nbytes, budget)


shapes = st.lists(st.tuples(st.integers(4, 40), st.integers(4, 40)), min_size=1, max_size=3)
budgets = st.one_of(st.integers(20, 6000).map(str),
                    st.integers(1, 40).map(lambda k: f"{k}KB"))


def _pair(d: Path, dims: list[tuple[int, int]], seed: int, bias: bool, norm: bool) -> None:
    """A base and a tuned checkpoint (safetensors, no config): linear layers changed by a
    low-rank update plus noise, with optional bias and norm changes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i, (o, n) in enumerate(dims):
        w = torch.randn(o, n, generator=g)
        base[f"layers.{i}.proj.weight"] = w
        tuned[f"layers.{i}.proj.weight"] = w + 0.1 * torch.randn(o, 3, generator=g) @ torch.randn(
            3, n, generator=g) + 0.01 * torch.randn(o, n, generator=g)
        b = torch.randn(o, generator=g)
        base[f"layers.{i}.proj.bias"] = b
        tuned[f"layers.{i}.proj.bias"] = b + (0.1 if bias else 0.0)
        nw = torch.ones(n)
        base[f"layers.{i}.norm.weight"] = nw
        tuned[f"layers.{i}.norm.weight"] = nw + (0.1 if norm else 0.0)
    for name, sd in (("base", base), ("tuned", tuned)):
        (d / name).mkdir(parents=True)
        save_file(sd, d / name / "model.safetensors")


@PROPERTY
@given(dims=shapes, budget=budgets, dtype=st.sampled_from(list(DTYPE)),
       bias=st.booleans(), norm=st.booleans(), seed=st.integers(0, 1000))
def test_extract_budget_is_never_exceeded(tmp_path_factory, dims, budget, dtype, bias, norm,
                                          seed):
    d = tmp_path_factory.mktemp("extract-budget")
    _pair(d, dims, seed, bias, norm)
    res = run_cli("extract", d / "base", d / "tuned", "-o", d / "out", "--budget", budget,
                  "--dtype", dtype)
    _within(res, d / "out", budget)


def _adapters(d: Path, dims: list[tuple[int, int]], n: int, seed: int, bias: bool,
              full: bool, dtype: str) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    paths = []
    for a in range(n):
        ad = LoraAdapter(source_format="peft")
        for i, (o, k) in enumerate(dims):
            r = 1 + (a + i) % 4
            ad.add(LoraModule(f"layers.{i}.proj", torch.randn(r, k, generator=g).to(DTYPE[dtype]),
                              torch.randn(o, r, generator=g).to(DTYPE[dtype]), float(2 * r),
                              bias=torch.randn(o, generator=g).to(DTYPE[dtype]) if bias else None))
        if full:  # a full tensor of its own per adapter: they replace, they do not add
            ad.full[f"layers.{a}.norm.weight"] = torch.randn(dims[0][1], generator=g)
        paths.append(peft.write(ad, d / f"a{a}"))
    return paths


@PROPERTY
@given(dims=shapes, budget=budgets, dtype=st.sampled_from(list(DTYPE)),
       method=st.sampled_from(["svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
       n=st.integers(1, 3), bias=st.booleans(), full=st.booleans(), seed=st.integers(0, 1000))
def test_combine_and_resize_budget_is_never_exceeded(tmp_path_factory, dims, budget, dtype,
                                                     method, n, bias, full, seed):
    d = tmp_path_factory.mktemp("combine-budget")
    paths = _adapters(d, dims, n, seed, bias, full, dtype)
    res = run_cli("combine", *paths, "--method", method, "--budget", budget, "--dtype", dtype,
                  "-o", d / "out")
    _within(res, d / "out", budget)
    res = run_cli("resize", paths[0], "--budget", budget, "--dtype", dtype, "-o", d / "r")
    _within(res, d / "r", budget)


# --------------------------------------------------------------------------- numbers


def test_budget_counts_the_bytes_of_the_dtype_written(tmp_path):
    paths = _adapters(tmp_path, [(32, 32), (32, 32)], 2, 0, False, False, "bf16")
    for dtype, per in (("fp32", 4), ("bf16", 2)):
        out = tmp_path / f"c-{dtype}"
        res = run_cli("combine", *paths, "--method", "ties", "--budget", "2KB", "--dtype",
                      dtype, "-o", out, "--json")
        assert res.rc == 0, res.err
        params, nbytes = _written(out)
        assert nbytes <= 2000 and nbytes == params * per
        assert json.loads(res.out)["policy"] == "budget 2KB (2,000 bytes)"


def test_extract_budget_counts_bias_changes_of_tensors_not_factorised(tmp_path):
    _pair(tmp_path, [(16, 16), (16, 16)], 0, bias=True, norm=False)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--budget", "200", "--exclude", "layers.1.proj.weight", "--json")
    assert res.rc == 0, res.err
    assert _written(tmp_path / "o")[0] <= 200
    assert "layers.1.proj.bias" in json.loads(res.out)["full_tensors"]


def test_resize_energy_leaves_a_zero_module_out(tmp_path):
    g = torch.Generator().manual_seed(0)
    ad = LoraAdapter(source_format="peft")
    decay = torch.tensor([1.0, 0.3, 0.1, 0.03])  # 90 % of the energy in the first directions
    ad.add(LoraModule("a", torch.randn(4, 8, generator=g),
                      torch.randn(8, 4, generator=g) * decay, 4.0))
    ad.add(LoraModule("b", torch.randn(4, 8, generator=g), torch.zeros(8, 4), 4.0))
    peft.write(ad, tmp_path / "in")
    res = run_cli("resize", tmp_path / "in", "--energy", "0.9", "-o", tmp_path / "out", "--json")
    assert res.rc == 0, res.err
    ranks = {m["name"]: m["rank"] for m in json.loads(res.out)["modules"]}
    assert ranks["b"] == 0 and 0 < ranks["a"] < 4
    assert set(read_adapter(str(tmp_path / "out")).modules) == {"a"}


def test_a_rank_above_full_rank_and_an_oversized_adapter_are_said(tmp_path):
    _pair(tmp_path, [(12, 20)], 0, bias=False, norm=False)
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--rank", "5000", "--json")
    assert res.rc == 0, res.err
    rep = json.loads(res.out)
    assert rep["modules"][0]["rank"] == 12 and rep["modules"][0]["full_rank"] == 12
    assert "--rank 5000 is above the full rank of 1 module(s)" in res.err
    assert "hold more values in their two factors than the matrix itself" in res.err
    assert "larger than the model it was extracted from" in res.err
    assert "note" not in run_cli("-q", "extract", tmp_path / "base", tmp_path / "tuned", "-o",
                                 tmp_path / "q", "--rank", "5000").err


def test_cat_takes_no_rank_policy(tmp_path):
    paths = _adapters(tmp_path, [(8, 8)], 2, 0, False, False, "fp32")
    res = run_cli("combine", *paths, "--method", "cat", "--rank", "8", "-o", tmp_path / "o")
    assert res.rc == 2 and "--method svd" in res.err and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("content, says", [
    # a GGUF header promising 5 tensors it does not hold
    (b"GGUF\x03\x00\x00\x00\x05" + bytes(47), "not a readable GGUF file"),
    (b'{"architectures": ["LlamaForCausalLM"]}\n', "JSON file, not weights"),
    (b"these are my notes about the fine-tune\n", "text file, not weights"),
    (bytes(range(200, 256)) * 2, "not a checkpoint loratool reads")])
def test_inspect_says_what_a_file_is(tmp_path, content, says):
    for name in ("x.gguf", "x.bin", "x.json", "x.safetensors"):
        p = tmp_path / name
        p.write_bytes(content)
        res = run_cli("inspect", p)
        if name == "x.safetensors" and says == "not a checkpoint loratool reads":
            assert res.rc == 1 and "safetensors" in res.err  # damaged: its own message
            continue
        assert res.rc == 1 and says in res.err and "header length" not in res.err, res.err


def test_budget_refusal_names_the_option_that_frees_room(tmp_path):
    """What is stored in full comes first; the advice names what leaves it out, in numbers."""
    from conftest import finetuned, llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval()
    base.save_pretrained(tmp_path / "base")
    finetuned(base).save_pretrained(tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--budget", "10000")
    # refused as soon as embed_tokens and lm_head (2 × 128 × 64) are seen, before any SVD
    assert res.rc == 1 and "--embed-lora saves 16,384" in res.err, res.err
    assert "embeddings and heads in full: 16,384" in res.err
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "o",
                  "--budget", "10000", "--embed-lora")
    assert res.rc == 0, res.err  # the advice was sufficient
    assert _written(tmp_path / "o")[0] <= 10000


def test_max_error_advice_is_possible_and_sufficient(tmp_path):
    _pair(tmp_path, [(12, 20)], 0, bias=False, norm=False)
    b, t = tmp_path / "base", tmp_path / "tuned"
    # fp32 factors at full rank: nothing but a looser target can help
    res = run_cli("extract", b, t, "-o", tmp_path / "o", "--max-error", "0", "--dtype", "fp32")
    assert res.rc == 1 and "ask for --max-error" in res.err and "--dtype" not in res.err
    assert "--max-rank" not in res.err
    suggested = res.err.split("ask for --max-error ")[1].split()[0]
    res = run_cli("extract", b, t, "-o", tmp_path / "o", "--max-error", suggested,
                  "--dtype", "fp32")
    assert res.rc == 0, res.err
    # bf16 factors: float32 ones meet it, and are suggested
    res = run_cli("extract", b, t, "-o", tmp_path / "o2", "--max-error", "1e-4", "--dtype",
                  "bf16")
    assert res.rc == 1 and "use --dtype fp32" in res.err, res.err
    assert run_cli("extract", b, t, "-o", tmp_path / "o2", "--max-error", "1e-4", "--dtype",
                   "fp32").rc == 0
    # capped by --max-rank below what the spectrum needs: raise it
    res = run_cli("extract", b, t, "-o", tmp_path / "o3", "--max-error", "0.001", "--max-rank",
                  "2", "--dtype", "fp32")
    assert res.rc == 1 and "raise --max-rank" in res.err, res.err


def test_combine_refuses_doubled_full_tensors_before_any_math(tmp_path, monkeypatch):
    import loratool.verbs.combine_methods as combine

    paths = _adapters(tmp_path, [(8, 8)], 1, 0, False, True, "fp32")
    paths += _adapters(tmp_path / "b", [(8, 8)], 1, 1, False, True, "fp32")
    monkeypatch.setattr(combine, "dense_method", lambda *a, **k: pytest.fail("math ran"))
    res = run_cli("combine", *paths, "--method", "ties", "-o", tmp_path / "o")
    assert res.rc == 1 and "both replace layers.0.norm.weight" in res.err, res.err


def test_resize_speaks_of_one_input_and_shows_each_module(tmp_path):
    paths = _adapters(tmp_path, [(16, 16), (16, 12)], 1, 0, False, False, "fp32")
    res = run_cli("resize", paths[0], "--rank", "1", "-o", tmp_path / "o")
    assert res.rc == 0, res.err
    assert "ranks 1–2 → 1" in res.out and "against the input" in res.out
    assert "layers.*.proj     ×2" in res.out  # per (folded) module: rank and error
    assert "weighted sum" not in res.out
    text = run_cli("resize", "--help").out
    assert "first input" not in text and "the input's" in text


# --------------------------------------------------------------------------- grammar


def test_format_and_to_are_one_option_and_the_suffix_decides(tmp_path):
    _pair(tmp_path, [(12, 20)], 0, bias=False, norm=False)
    b, t = tmp_path / "base", tmp_path / "tuned"
    res = run_cli("extract", b, t, "-o", tmp_path / "a.gguf", "--rank", "2", "--skip-full")
    # GGUF needs an architecture: the suffix chose it
    assert res.rc == 1 and "gguf" in res.err.lower()
    res = run_cli("extract", b, t, "-o", tmp_path / "k.safetensors", "--rank", "2", "--json")
    assert res.rc == 0 and json.loads(res.out)["format"] == "kohya"
    assert (tmp_path / "k.safetensors").is_file()
    res = run_cli("extract", b, t, "-o", tmp_path / "p.safetensors", "--format", "peft")
    assert res.rc == 2 and "drop the suffix or --format kohya" in res.err
    res = run_cli("extract", b, t, "-o", tmp_path / "x.bin")
    assert res.rc == 2 and "not .bin" in res.err
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "x.bin").exists()
    res = run_cli("convert", tmp_path / "k.safetensors", "--format", "peft", "-o",
                  tmp_path / "back")
    assert res.rc == 0, res.err
    res = run_cli("convert", tmp_path / "back", "--to", "kohya", "-o", tmp_path / "k2")
    assert res.rc == 0 and (tmp_path / "k2" / "lora.safetensors").exists()


def _commands():
    from loratool.cli import cli

    return cli.commands


def test_quiet_works_on_every_command():
    for name, cmd in _commands().items():
        assert "--quiet" in [o for p in cmd.params for o in p.opts], name


@pytest.mark.parametrize("args, needle", [
    (["extract", "b", "t", "-o", "o", "--rank", "0"], "--rank"),
    (["extract", "b", "t", "-o", "o", "--max-error", "2"], "--max-error"),
    (["extract", "b", "t", "-o", "o", "--device", "xpu"], "--device"),
    (["combine", "a", "b", "-o", "o", "--method", "ties", "--density", "1.5"], "--density"),
    (["merge", "b", "a", "-o", "o", "--weight", "nan"], "--weight"),
    (["merge", "b", "a", "-o", "o", "--max-shard-size", "lots"], "--max-shard-size"),
    (["export", "b", "-o", "o", "--opset", "0"], "--opset"),
    (["export", "b", "-o", "o", "--atol", "-1"], "--atol")])
def test_bad_values_are_usage_errors(tmp_path, args, needle):
    res = run_cli(*args)
    assert res.rc == 2 and needle in res.err, res


def test_bare_loratool_prints_help():
    res = run_cli()
    assert res.rc == 0 and "Commands:" in res.out and "extract" in res.out


def test_every_option_has_help():
    for name, cmd in _commands().items():
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{name} {p.opts[0]} has no help text"


def test_docs_list_every_option_of_every_command():
    """docs/cli.md's option table is checked against the click definitions: no drift."""
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    table = text.split("## Every option")[1].split("\n## ")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows.setdefault(cells[0].strip("`"), set()).update(
                o.strip("` ") for o in cells[1].split(","))
    for name, cmd in _commands().items():
        want = {o for p in cmd.params if p.param_type_name == "option" for o in p.opts
                if o.startswith("--")} - {"--help"}
        assert rows.get(name) == want, (name, want ^ rows.get(name, set()))
    assert set(rows) == set(_commands())


def test_pull_refuses_an_existing_output_and_push_takes_a_repo_type(tmp_path):
    (tmp_path / "there").mkdir()
    (tmp_path / "there" / "mine.txt").write_text("keep")
    res = run_cli("pull", "org/name", "-o", tmp_path / "there")
    assert res.rc == 1 and "--force" in res.err
    assert tree(tmp_path / "there") == {"mine.txt": b"keep"}
    from loratool.cli import cli

    assert "--repo-type" in [o for p in cli.commands["push"].params for o in p.opts]
