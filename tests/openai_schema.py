"""Validation of our response bodies and stream events against OpenAI's published schemas
(tests/data/openai-response-schemas.json, extracted by tests/data/extract_openai_schemas.py)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema

DATA = Path(__file__).parent / "data" / "openai-response-schemas.json"


def _nullable(node):
    """OpenAPI's `nullable: true` as JSON Schema (null allowed only where the spec says so)."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _nullable(schema) for name, schema in value.items()}
        elif key != "nullable":
            out[key] = _nullable(value)
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _document() -> dict:
    return {"components": _nullable(json.loads(DATA.read_text())["components"])}


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{schema_name}", **_document()}
    return jsonschema.Draft202012Validator(root)


def assert_conforms(obj, schema_name: str) -> None:
    errors = sorted(validator(schema_name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        worst = jsonschema.exceptions.best_match(errors)
        raise AssertionError(f"{schema_name}: {worst.message} at {list(worst.absolute_path)}\n"
                             f"{json.dumps(obj)[:2000]}")
