"""Typed results: every verb returns a dataclass of these, and everything shown comes from it
— ``--json`` is :meth:`Report.to_json`, the terminal's text is made from the same fields, and
the JSON schema in the docs is generated from the classes (:func:`schema`), so that the three
cannot drift apart.

Example::

    @dataclass
    class Thing(Report):
        name: str
        note: str | None = optional()      # left out of JSON when None

    Thing("a").to_json()                   # '{\\n  "name": "a"\\n}'
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

# what JSON holds: free-form values (GGUF metadata, configs) are typed as this
JsonValue = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]
_OMIT = "omit_none"


def optional(default: None = None) -> Any:  # a dataclass field, typed as its default is
    """A field left out of JSON when it is None (a part a report has only sometimes)."""
    return dataclasses.field(default=default, metadata={_OMIT: True})


def plain(value: object) -> JsonValue:
    """A report (or a part of one) as plain JSON values; non-finite floats become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, JsonValue] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.metadata.get(_OMIT):
                continue
            out[f.name] = plain(v)
        return out
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value  # type: ignore[return-value]


class Report:
    """What a verb returns: a dataclass whose JSON is the report ``--json`` prints."""

    def render(self) -> str:
        """The report as the terminal shows it (made from the same fields as the JSON)."""
        raise NotImplementedError(type(self).__name__)

    def to_dict(self) -> dict[str, JsonValue]:
        """The report as plain JSON values."""
        out = plain(self)
        assert isinstance(out, dict)
        return out

    def to_json(self) -> str:
        """The report as JSON text (control characters escaped, as JSON does)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def json_schema(cls) -> dict[str, JsonValue]:
        """The JSON schema of this report, from its fields' types."""
        return {"$schema": "https://json-schema.org/draft/2020-12/schema",
                "title": cls.__name__, **schema(cls)}


def schema(tp: object) -> dict[str, JsonValue]:
    """A JSON schema for a type: a dataclass, a union, a list, a dict or a JSON scalar."""
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:  # a value that is not finite is written as null: JSON has no inf or NaN
        return {"type": ["number", "null"]}
    if tp is str:
        return {"type": "string"}
    if tp is JsonValue or tp is Any or tp is object or tp == typing.ForwardRef("JsonValue"):
        return {}  # any JSON value (free-form: a config, GGUF metadata)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema(args[1]) if args else {}}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props, required = {}, []
        for f in dataclasses.fields(tp):
            props[f.name] = schema(hints[f.name])
            if not f.metadata.get(_OMIT):
                required.append(f.name)
        return {"type": "object", "properties": props, "required": required,
                "additionalProperties": False}
    raise TypeError(f"no JSON schema for {tp!r}")
