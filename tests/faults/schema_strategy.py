"""A hypothesis strategy from a JSON schema, for the subset pydantic emits for the server's request models
($ref/$defs, anyOf, enum/const, object with properties/required/additionalProperties, array, string,
integer, number, boolean, null, {} = anything). Optional properties are present or absent at random.
(hypothesis-jsonschema would do this, but its current release breaks on current hypothesis internals.)"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(option, defs) for option in schema.get("anyOf", schema.get("oneOf"))])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = {name: from_schema(sub, defs) for name, sub in properties.items() if name in required}
        optional = {name: from_schema(sub, defs) for name, sub in properties.items() if name not in required}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not properties:  # a map, e.g. logit_bias
            return st.dictionaries(st.text(max_size=8), from_schema(extra, defs), max_size=4)
        return st.fixed_dictionaries(fixed, optional=optional)
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 6), 6))
    if kind == "string":
        return st.text(max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return ANY_JSON  # {}: any JSON value
