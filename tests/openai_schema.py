"""Answers checked against OpenAI's published OpenAPI document (tests/openai_openapi/), types exact.

One allowance, and only one: OpenAI's schemas type optional fields strictly (`"output_file_id":
{"type": "string"}`) while OpenAI itself answers null for an optional field it has no value for,
and its SDKs declare those fields optional. So a property that its object does not list in
`required` may also be null; a required property must match its schema exactly, and a value
that is present must have the schema's type (an integer is never a string or a float).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).parent / "openai_openapi" / "openapi.json"
_NULL = {"type": "null"}
# JSON Schema counts 1.0 as an integer; a typed client (Go, Rust, Java) refuses it for an int field.
_EXACT = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)))


def _optional_may_be_null(node: Any) -> Any:
    """The document with every non-required property also allowing null (see the module's note)."""
    if isinstance(node, list):
        return [_optional_may_be_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _optional_may_be_null(value) for key, value in node.items()}
    properties = node.get("properties")
    if isinstance(properties, dict) and all(isinstance(value, dict) for value in properties.values()):
        required = set(node.get("required", ()))
        node["properties"] = {name: schema if name in required else {"anyOf": [schema, _NULL]}
                              for name, schema in properties.items()}
    return node


@functools.cache
def _registry() -> tuple[Registry, dict[str, Any]]:
    document = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    components = copy.deepcopy(document["components"])
    # Only the schemas are rewritten: paths and examples are never validated against.
    components["schemas"] = _optional_may_be_null(components["schemas"])
    resource = Resource.from_contents({"components": components}, default_specification=DRAFT202012)
    return Registry().with_resource("openai", resource), components["schemas"]


def schema_names() -> set[str]:
    return set(_registry()[1])


def errors(name: str, instance: Any) -> list[str]:
    """What is wrong with `instance` as OpenAI's `components.schemas[name]`, one line per problem."""
    registry, schemas = _registry()
    if name not in schemas:
        raise KeyError(f"OpenAI's document has no schema {name!r}")
    validator = _EXACT({"$ref": f"openai#/components/schemas/{name}"}, registry=registry)
    found = []
    for error in validator.iter_errors(instance):
        # anyOf/oneOf errors hide the real cause one level down: report the deepest ones.
        leaves = [error]
        while leaves and leaves[0].context:
            deepest = max(len(e.absolute_path) for e in leaves[0].context)
            leaves = [e for e in leaves[0].context if len(e.absolute_path) == deepest]
        for leaf in leaves[:3]:
            path = "/".join(map(str, leaf.absolute_path)) or "(root)"
            found.append(f"{name} at {path}: {leaf.message[:300]}")
    return found


def assert_valid(name: str, instance: Any) -> None:
    problems = errors(name, instance)
    assert not problems, "\n".join(problems)
