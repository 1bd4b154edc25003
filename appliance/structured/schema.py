"""JSON Schema for constrained generation: what a llama.cpp grammar can enforce, the grammar
itself, and the check of what came out.

llama.cpp's schema converter (`llama_cpp.llama_grammar`) skips what it cannot express and says
nothing: `minimum` on a number, `format: email`, `minLength` beside a `pattern` would be dropped
and the model could produce anything there. So a schema is first checked against an allowlist
of keywords the converter honours, and anything else is refused with the path and keyword
named (`oneOf` too: a grammar cannot enforce "exactly one"). What the grammar lets through is
validated again with `jsonschema` (a `format: date` grammar lets February 30th through, a
`stop` string can cut the JSON short): an answer is never returned as structured if it does
not validate.

jsonschema and llama_cpp are imported on first use: a server that never sees a schema pays
neither.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ApplianceError, InvalidInput

#: Deepest nesting of subschemas accepted (a bound on the converter's recursion).
MAX_SCHEMA_DEPTH = 32
#: Most grammar rules one schema may turn into (a bound on the grammar llama.cpp parses).
MAX_GRAMMAR_RULES = 2000
#: Schemas (with where they were given) remembered as checked.
CHECKED_SCHEMAS = 256
#: What `{"type": "json_object"}` asks for: any JSON object.
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

#: Keywords that describe and constrain nothing: accepted anywhere.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
     "readOnly", "writeOnly", "discriminator"}
)  # fmt: skip
#: What the converter enforces, by the kind of schema that may carry it.
_ALLOWED = frozenset(
    {"type", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions",
     "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
     "maxItems", "uniqueItems", "pattern", "format", "minLength", "maxLength"}
)  # fmt: skip
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})  # fmt: skip
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


class UnsupportedSchema(InvalidInput):
    """A schema (or a keyword in it) that a grammar cannot enforce: refused, not dropped."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.detail = message


class InvalidOutput(ApplianceError):
    """What the model produced does not validate against the schema it was held to (502: the
    upstream, the model, gave a bad answer; the request itself was fine)."""

    status = 502


@dataclass(frozen=True)
class JsonSpec:
    """An output that must be JSON valid against `schema` (checked by `check_schema`)."""

    schema: dict[str, Any]
    #: Where it came from in the request, for error messages.
    where: str = "response_format"

    def validate(self, text: str) -> Any:
        """The parsed value; raises InvalidOutput naming the first violation."""
        return validate(self.schema, text, self.where)


def json_spec(schema: Any, where: str) -> JsonSpec:
    """A checked spec: 400 naming the path and keyword of anything unsupported. A schema seen
    before (clients send the same one request after request) is not checked again: the
    metaschema check costs milliseconds, the lookup microseconds."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(where, "must be a JSON Schema object")
    try:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        raise UnsupportedSchema(where, "must be a JSON Schema object") from None
    _checked(key, where)
    return JsonSpec(schema, where)


@functools.lru_cache(maxsize=CHECKED_SCHEMAS)
def _checked(key: str, where: str) -> None:
    check_schema(json.loads(key), where)


# -- checking ---------------------------------------------------------------------------------
def _jsonschema() -> Any:
    try:
        import jsonschema
    except ImportError:
        raise InvalidInput(
            "structured output needs the jsonschema package: pip install 'appliance[gguf]'"
        ) from None
    return jsonschema


def check_schema(schema: Any, where: str) -> None:
    """Refuse a schema that is not a JSON Schema, or that uses what a grammar cannot enforce."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(where, "must be a JSON Schema object")
    jsonschema = _jsonschema()
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "".join(f"[{p!r}]" for p in exc.path)
        raise UnsupportedSchema(f"{where}{at}", f"not a valid JSON Schema: {exc.message}") from None
    _check(schema, where, 0)


def _check(schema: Any, path: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise UnsupportedSchema(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if not isinstance(schema, dict):
        raise UnsupportedSchema(path, "boolean schemas are only supported as additionalProperties")
    if "oneOf" in schema:
        raise UnsupportedSchema(
            path, "unsupported keyword oneOf: a grammar cannot enforce exactly one (use anyOf)"
        )
    unknown = sorted(set(schema) - _ALLOWED - _ANNOTATIONS)
    if unknown:
        raise UnsupportedSchema(
            path,
            f"unsupported keyword{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: a "
            "grammar cannot enforce "
            f"{'them' if len(unknown) > 1 else 'it'} (remove or check after generation)",
        )
    constraints = set(schema) - _ANNOTATIONS - {"$defs", "definitions"}
    for key in ("$ref", "anyOf", "allOf"):
        if key in schema and constraints - {key}:
            others = ", ".join(sorted(constraints - {key}))
            raise UnsupportedSchema(path, f"{key} beside {others} is not supported")
    if "$ref" in schema and not str(schema["$ref"]).startswith("#/"):
        raise UnsupportedSchema(f"{path}.$ref", "only local references (#/...) are supported")
    if "allOf" in schema and len(schema["allOf"]) != 1:
        raise UnsupportedSchema(f"{path}.allOf", "only an allOf of one schema is supported")
    if schema.get("uniqueItems") is True:
        raise UnsupportedSchema(f"{path}.uniqueItems", "uniqueItems: true is not supported")
    types = schema.get("type")
    if isinstance(types, list) and ("enum" in schema or "const" in schema):
        raise UnsupportedSchema(path, "a list of types beside enum/const is not supported")
    _check_string(schema, path)
    if "prefixItems" in schema and "items" in schema:
        raise UnsupportedSchema(path, "prefixItems together with items is not supported")
    if ("minItems" in schema or "maxItems" in schema) and isinstance(schema.get("items"), list):
        raise UnsupportedSchema(path, "minItems/maxItems with a tuple of items is not supported")
    if ("minItems" in schema or "maxItems" in schema) and "items" not in schema:
        raise UnsupportedSchema(path, "minItems/maxItems need items")
    props = schema.get("properties") or {}
    missing = [name for name in schema.get("required", []) if name not in props]
    if missing:
        raise UnsupportedSchema(
            f"{path}.required", f"names {', '.join(missing)}, not declared in properties"
        )
    for name, sub in props.items():
        _check(sub, f"{path}.properties.{name}", depth + 1)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _check(extra, f"{path}.additionalProperties", depth + 1)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            _check(sub, f"{path}.{key}.{name}", depth + 1)
    for key in ("anyOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            _check(sub, f"{path}.{key}[{i}]", depth + 1)
    items = schema.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            _check(sub, f"{path}.items[{i}]", depth + 1)
    elif items is not None:
        _check(items, f"{path}.items", depth + 1)


def _check_string(schema: dict[str, Any], path: str) -> None:
    fmt = schema.get("format")
    if fmt is not None and fmt not in _FORMATS:
        raise UnsupportedSchema(
            f"{path}.format", f"format {fmt!r} is not supported ({', '.join(sorted(_FORMATS))} are)"
        )
    shapes: list[str] = [k for k in ("pattern", "format") if k in schema]
    lengths: list[str] = [k for k in ("minLength", "maxLength") if k in schema]
    if len(shapes) > 1 or (shapes and lengths):
        raise UnsupportedSchema(
            path, f"{' with '.join(shapes + lengths)} together is not supported"
        )
    if "pattern" in schema:
        _pattern(str(schema["pattern"]), f"{path}.pattern")


# -- patterns ---------------------------------------------------------------------------------
_CLASS_SHORTHANDS = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
_QUANTIFIER = re.compile(r"^\{\d*(,\d*)?\}$")


def _pattern(pattern: str, path: str) -> str:
    """The pattern as the converter reads it: anchored at both ends around one group
    (stricter than a search: what it generates still matches; the group keeps a top-level `|`
    inside the string's quotes), \\d \\w \\s spelled as classes (\\s as a space only: a raw tab
    or newline is not valid inside a JSON string), escaped punctuation as a class of one (GBNF
    has no escape for it). Refuses what it cannot express."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body):
                raise UnsupportedSchema(path, "ends with a lone backslash")
            n = body[i + 1]
            if n in _CLASS_SHORTHANDS:
                shorthand = _CLASS_SHORTHANDS[n]
                out.append(shorthand if in_class else f"[{shorthand}]")
            elif n.isalnum() and n not in "nrt":
                raise UnsupportedSchema(path, f"the escape \\{n} is not supported")
            elif not n.isalnum() and n not in '\\[](){}|*+?^-"' and not in_class:
                out.append(f"[{n}]")
            elif not n.isalnum() and n not in "\\]-^" and in_class:
                out.append(n)
            else:
                out.append(c + n)
            i += 2
            continue
        if not in_class:
            if c == "(" and body[i + 1 : i + 2] == "?":
                raise UnsupportedSchema(
                    path, "groups with (? (lookarounds, named) are not supported"
                )
            if c in "*+?}" and body[i + 1 : i + 2] in ("?", "+"):
                raise UnsupportedSchema(path, "lazy and possessive quantifiers are not supported")
            if c in "^$":
                raise UnsupportedSchema(path, "anchors are only supported at the ends")
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            if body[i + 1 : i + 2] == "^":  # a negated class: the ^ is no anchor
                out.append("^")
                i += 1
            if body[i + 1 : i + 2] == "]":  # a leading ] is a literal
                out.append("\\]")
                i += 1
            i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        if c == "{" and not in_class:
            close = body.find("}", i)
            if close < 0 or not _QUANTIFIER.match(body[i : close + 1]):
                raise UnsupportedSchema(path, f"a malformed quantifier at {body[i : i + 8]!r}")
        out.append(c)
        i += 1
    return "^(" + "".join(out) + ")$"


# -- the grammar ------------------------------------------------------------------------------
def _normalized(schema: Any, prefix: str) -> Any:
    """A copy the converter reads as intended: a list of types becomes anyOf (the converter
    would drop the keywords beside it), an allOf of one is that one, patterns are rewritten,
    and definitions are renamed with `prefix` (the converter names a reference's rule by its
    last path part, so two schemas' `Item`, or a definition called `string`, would collide)."""
    if isinstance(schema, list):
        return [_normalized(s, prefix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if not set(schema) - _ANNOTATIONS:  # any value (the converter would make it an object)
        return {"anyOf": [{"type": t} for t in sorted(_TYPES - {"integer"})]}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key in ("enum", "const", "required"):
            out[key] = value
        elif key in ("properties", "$defs", "definitions"):  # names, then schemas
            rename = "" if key == "properties" else prefix
            out[key] = {f"{rename}{k}": _normalized(v, prefix) for k, v in value.items()}
        elif key == "$ref":
            head, _, last = str(value).rpartition("/")
            defs = head in ("#/$defs", "#/definitions")
            out[key] = f"{head}/{prefix}{last}" if defs else value
        elif key == "pattern":
            out[key] = _pattern(str(value), "pattern")
        else:
            out[key] = _normalized(value, prefix)
    if "allOf" in out:
        (only,) = out.pop("allOf")
        out.update(only)
    types = out.get("type")
    if isinstance(types, list):
        keep = ("$defs", "definitions")
        rest = {k: v for k, v in out.items() if k not in ("type", *keep)}
        out = {k: v for k, v in out.items() if k in keep}
        out["anyOf"] = [{**rest, "type": t} for t in types]
    return out


#: A JSON string's character with control characters excluded (the converter's own allows a
#: raw newline in a string, which is not JSON).
_CHAR = (
    r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
)
#: What `.` in a pattern may produce inside a JSON string.
_DOT = r'[^"\\\x00-\x1F]'


def schema_rules(
    parts: list[tuple[dict[str, Any], str, str]],
) -> tuple[dict[str, str], list[str]]:
    """GBNF rules (name -> body) for each (schema, rule name, what it is for error messages):
    one converter for all, so shared primitives are one rule; with the name of each schema's
    top rule. A rule called `space` (optional whitespace) comes with them."""
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, SchemaConverter

    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    tops = []
    for schema, name, label in parts:
        try:
            resolved = converter.resolve_refs(_inlined(_normalized(schema, f"{name}-")), name)
            tops.append(converter.visit(resolved, name))  # type: ignore[no-untyped-call]
        except UnsupportedSchema:
            raise
        except Exception as exc:  # the converter asserts, indexes and recurses freely
            raise UnsupportedSchema(label, f"cannot be turned into a grammar: {exc}") from None
    rules: dict[str, str] = dict(converter._rules)
    if len(rules) > MAX_GRAMMAR_RULES:
        raise UnsupportedSchema(parts[0][2], f"needs more than {MAX_GRAMMAR_RULES} grammar rules")
    for key, body in rules.items():
        if body == PRIMITIVE_RULES["char"].content:
            rules[key] = _CHAR
        elif key.startswith("dot") and body in (r"[^\x0A\x0D]", r"[\U00000000-\U0010FFFF]"):
            rules[key] = _DOT
    return rules, tops


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A top-level `$ref` into the schema's own definitions replaced by what it names (the
    converter skips the definitions beside a `$ref`, and the references inside them)."""
    ref = schema.get("$ref")
    if not isinstance(ref, str):
        return schema
    head, _, last = ref.rpartition("/")
    defs = schema.get(head[2:]) if head in ("#/$defs", "#/definitions") else None
    if not isinstance(defs, dict) or not isinstance(defs.get(last), dict):
        return schema
    rest = {k: v for k, v in schema.items() if k != "$ref"}
    return {**defs[last], **rest}


def grammar_for_schema(schema: dict[str, Any]) -> str:
    """A GBNF grammar (root rule `root`) whose every sentence is JSON the schema may accept."""
    rules, (top,) = schema_rules([(schema, "answer", "response_format")])
    rules["root"] = top
    return format_rules(rules)


def format_rules(rules: dict[str, str]) -> str:
    return "\n".join(f"{name} ::= {body}" for name, body in sorted(rules.items()))


# -- validation -------------------------------------------------------------------------------
def validate(schema: dict[str, Any], text: str, where: str) -> Any:
    """Parse `text` as JSON and validate it against `schema`: the value, or InvalidOutput."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidOutput(f"the model's answer is not valid JSON ({where}): {exc}") from None
    check_value(schema, value, where)
    return value


def check_value(schema: dict[str, Any], value: Any, where: str) -> None:
    jsonschema = _jsonschema()
    cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(
        cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value)
    )
    if error is not None:
        at = "".join(f"[{p!r}]" for p in error.absolute_path) or "the answer"
        raise InvalidOutput(
            f"the model's answer does not match the schema ({where}): at {at}: {error.message}"
        )


__all__ = [
    "ANY_JSON_OBJECT",
    "InvalidOutput",
    "JsonSpec",
    "UnsupportedSchema",
    "check_schema",
    "grammar_for_schema",
    "json_spec",
    "validate",
]
