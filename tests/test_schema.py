"""The JSON of `--json` against the schema generated from the report classes: the docs hold
the generated schema as it is, each command's output validates against its command's schema,
and a report that breaks its schema is caught (conftest validates every report a test turns
into JSON, in every test)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import run_cli

from loratool.reports.schemas import SCHEMAS, command_schema, markdown

DOC = Path(__file__).parent.parent / "docs" / "json-schema.md"


def test_the_docs_hold_the_schema_the_classes_give():
    assert DOC.read_text(encoding="utf-8") == markdown(), (
        "docs/json-schema.md is stale: python -m loratool.reports.schemas > "
        "docs/json-schema.md")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("schema")
    build_pair(d, seed=5)
    return d


def _json(*args: object) -> dict:
    res = run_cli(*args, "--json")
    assert res.rc == 0, res.err
    return json.loads(res.out)


def test_each_commands_json_validates_against_its_schema(demo, tmp_path):
    b, t, a = demo / "base", demo / "tuned", demo / "adapter"
    runs = {
        "inspect": [(b,), (a,), (t, "--against", b, "--filter", "*layers.0.*")],
        "extract": [(b, t, "-o", tmp_path / "ex", "--rank", "4")],
        "merge": [(b, a, "-o", tmp_path / "m", "--verify")],
        "unmerge": [(tmp_path / "m", a, "-o", tmp_path / "u")],
        "combine": [(a, tmp_path / "ex", "--method", "cat", "-o", tmp_path / "c")],
        "resize": [(tmp_path / "c", "--rank", "2", "-o", tmp_path / "r")],
        "convert": [(a, "--to", "kohya", "-o", tmp_path / "k.safetensors")],
        "analyze": [(b, t, "--target", "*layers.0.*"), (a, "--base", b),
                    ("--compare", a, tmp_path / "ex")],
    }
    for command, arg_lists in runs.items():
        validator = jsonschema.Draft202012Validator(command_schema(command))
        for args in arg_lists:
            validator.validate(_json(command, *args))


def test_every_command_with_json_has_a_schema():
    from loratool.cli import cli

    with_json = {name for name, c in cli.commands.items()
                 if any("--json" in p.opts for p in c.params)}
    assert with_json == set(SCHEMAS)


def test_a_report_that_breaks_its_schema_is_refused(demo):
    import loratool

    report = loratool.inspect(demo / "adapter")
    report.num_tensors = "many"  # type: ignore[assignment]
    with pytest.raises(jsonschema.ValidationError):
        report.to_json()
    extra = loratool.inspect(demo / "adapter").to_dict()
    extra["surprise"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(extra, command_schema("inspect"))
