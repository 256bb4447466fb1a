"""The public Python API: docs/api.md's examples run as written, every verb is typed and
documented, and `import loratool` stays light."""

from __future__ import annotations

import inspect as pyinspect
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import loratool

DOC = Path(__file__).parent.parent / "docs" / "api.md"
VERBS = ["inspect", "extract", "merge", "unmerge", "combine", "resize", "convert", "analyze",
         "export", "pull", "push"]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the examples name: base, tuned, and three adapters in adapters/."""
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("api")
    base, tuned, adapter = build_pair(d, seed=3)
    for name in ("style", "task", "chat"):
        shutil.copytree(adapter, d / "adapters" / name)
    return d


def test_the_examples_of_api_md_run_as_written(workdir):
    blocks = _blocks()
    assert len(blocks) >= 4
    for i, code in enumerate(blocks):
        res = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True,
                             text=True)
        assert res.returncode == 0, f"block {i + 1} of docs/api.md:\n{code}\n{res.stderr}"
    # what the examples wrote is what they say
    for name in ("style", "task", "chat"):
        assert (workdir / f"merged-{name}" / "model.safetensors.index.json").exists() or \
            (workdir / f"merged-{name}" / "model.safetensors").exists()
    assert (workdir / "checkpoints" / "adapter-1000" / "adapter_config.json").exists()
    assert (workdir / "scratch").is_dir()


def test_a_report_read_in_python_is_the_json_of_the_command(workdir):
    from conftest import run_cli

    report = loratool.inspect(workdir / "adapters" / "style")
    res = run_cli("inspect", workdir / "adapters" / "style", "--json")
    assert res.rc == 0
    assert res.out.strip() == report.to_json()


def test_every_verb_is_public_typed_and_documented():
    for name in VERBS:
        fn = getattr(loratool, name)
        assert callable(fn) and name in loratool.__all__
        doc = pyinspect.getdoc(fn) or ""
        assert "Example" in doc, f"loratool.{name} has no example in its docstring"
        hints = typing.get_type_hints(fn)
        assert "return" in hints, name
        assert typing.Any not in hints.values(), name
        ret = hints["return"]
        classes = typing.get_args(ret) or (ret,)
        assert all(issubclass(c, loratool.Report) for c in classes), (name, ret)
        params = pyinspect.signature(fn).parameters
        assert all(p.annotation is not pyinspect.Parameter.empty for p in params.values())


def test_import_loratool_loads_no_torch_and_errors_share_one_base():
    code = ("import sys, loratool\n"
            "assert loratool.__version__\n"
            "assert issubclass(loratool.OutputError, loratool.LoraToolError)\n"
            "loratool.InspectReport, loratool.MergeReport\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_an_error_raised_in_python_is_the_line_the_command_prints(workdir, tmp_path):
    from conftest import run_cli

    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(loratool.OutputError) as e:
        loratool.merge(workdir / "base", [workdir / "adapters" / "style"], out)
    res = run_cli("merge", workdir / "base", workdir / "adapters" / "style", "-o", out)
    assert res.rc == 1 and res.err.strip() == f"loratool: error: {e.value}"
    assert (out / "mine.txt").read_text() == "keep"
