"""The JSON schema of every command's ``--json``, generated from the report classes: what
``docs/json-schema.md`` holds (``python -m loratool.reports.schemas > docs/json-schema.md``
writes it; a test checks that it is current and that each command's output validates).

Example::

    SCHEMAS["merge"]          # [MergeReport, GgufMergeReport, PipelineMergeReport]
"""

from __future__ import annotations

import json

from .analyze import AdapterAnalysis, CompareAnalysis, FinetuneAnalysis
from .base import JsonValue, Report
from .combine import CombineReport
from .convert import ConvertReport
from .export import AdapterInputsExportReport, MergedExportReport
from .extract import ExtractReport
from .hub import PullReport, PushReport
from .inspect import InspectReport
from .merge import GgufMergeReport, MergeReport, PipelineMergeReport

# command → the reports it may print, in the order the docs list them
SCHEMAS: dict[str, list[type[Report]]] = {
    "inspect": [InspectReport],
    "extract": [ExtractReport],
    "merge": [MergeReport, GgufMergeReport, PipelineMergeReport],
    "unmerge": [MergeReport, PipelineMergeReport],
    "combine": [CombineReport],
    "resize": [CombineReport],
    "convert": [ConvertReport],
    "analyze": [FinetuneAnalysis, AdapterAnalysis, CompareAnalysis],
    "export": [MergedExportReport, AdapterInputsExportReport],
    "pull": [PullReport],
    "push": [PushReport],
}


def command_schema(command: str) -> dict[str, JsonValue]:
    """The schema a command's ``--json`` validates against: one of its report classes."""
    classes = SCHEMAS[command]
    if len(classes) == 1:
        return classes[0].json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"loratool {command} --json",
            "oneOf": [{k: v for k, v in c.json_schema().items() if k != "$schema"}
                      for c in classes]}


def markdown() -> str:
    """docs/json-schema.md: each command's report classes and their schemas."""
    out = ["# The JSON of `--json`", "",
           "Every command's `--json` prints one object: the report the command's Python "
           "function returns (`report.to_json()`), whose classes live in `loratool/reports/`. "
           "The schemas below are generated from those classes "
           "(`python -m loratool.reports.schemas > docs/json-schema.md`), and the tests "
           "validate each command's output against them. A number is `null` where its value "
           "is not finite (JSON has no infinity or NaN); a field marked optional is left out "
           "when it does not apply.", ""]
    for command, classes in SCHEMAS.items():
        names = ", ".join(f"`{c.__name__}`" for c in classes)
        out += [f"## {command}", "", f"Report: {names}.", "", "```json",
                json.dumps(command_schema(command), indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
