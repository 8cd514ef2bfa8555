"""Extract the response schemas our endpoints must conform to from OpenAI's published OpenAPI
description (openai/openai-openapi, MIT; see openai-response-schemas.NOTICE) into a small JSON file
the tests load: the named roots and every schema they reach through $ref, nothing else.

    python tests/data/extract_openai_schemas.py ../shared/reference/openai-openapi-subset.yaml
"""

import json
import sys
from pathlib import Path

import yaml

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Response", "ResponseStreamEvent", "ErrorResponse"]


def refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[-1]
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


DOC_KEYS = {"description", "example", "examples", "title", "x-oaiMeta", "x-oaiExpandable", "x-oaiTypeLabel",
            "deprecated", "x-stainless-const"}


def strip_docs(node):
    """The schema without its documentation keywords (the file stays small; validation is the same)."""
    if isinstance(node, list):
        return [strip_docs(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "$defs", "definitions"):  # maps of names to schemas
            out[key] = {name: strip_docs(schema) for name, schema in value.items()}
        elif key not in DOC_KEYS:
            out[key] = strip_docs(value)
    return out


def main(path: str) -> None:
    spec = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schemas = spec["components"]["schemas"]
    keep, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip_docs(schemas[name])
        todo.extend(refs(schemas[name]))
    out = Path(__file__).with_name("openai-response-schemas.json")
    out.write_text(json.dumps({"source": "openai/openai-openapi openapi.yaml (MIT), version "
                               + spec["info"]["version"], "components": {"schemas": dict(sorted(keep.items()))}},
                              indent=None, sort_keys=False))
    print(f"{len(keep)} schemas -> {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
