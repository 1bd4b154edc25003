"""Writes appliance/data/openapi_components.json: the component schemas of the published
documents in tests/schemas/ (KServe OIP REST, its generate extension, the OpenAI extract) that
the appliance's own /openapi.json refers to (appliance/api/openapi.py). Run it again after
refreshing one of those files; tests/api/test_openapi.py checks the output is current."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tests" / "schemas"
OUT = ROOT / "appliance" / "data" / "openapi_components.json"


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (OpenAI's 3.1 document still has it) as "or null"."""
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True:
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


def components() -> dict[str, Any]:
    oip = yaml.safe_load((SCHEMAS / "open_inference_rest.yaml").read_text(encoding="utf-8"))
    generate = yaml.safe_load((SCHEMAS / "generate_rest.yaml").read_text(encoding="utf-8"))
    openai = json.loads((SCHEMAS / "openai_v1.json").read_text(encoding="utf-8"))
    # generate's GenerateParameters says `allOf: {$ref: itself}`: no JSON Schema (allOf is an
    # array), and a reference to itself forever. Left out; the rest is as published.
    del generate["components"]["schemas"]["GenerateParameters"]["allOf"]
    out: dict[str, Any] = {}
    for doc in (oip, generate, openai):
        for name, schema in doc["components"]["schemas"].items():
            if name in out and out[name] != schema:
                raise SystemExit(f"two published documents define {name!r} differently")
            out[name] = schema
    out = _nullable(out)
    # OIP is OpenAPI 3.0 (draft 4): what it uses means the same in 3.1, but this would not.
    if '"exclusiveMinimum": true' in json.dumps(out):
        raise SystemExit("a 3.0-only keyword appeared: convert it for OpenAPI 3.1")
    responses = openai["components"].get("responses", {})
    return {"schemas": dict(sorted(out.items())), "responses": responses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args()
    text = json.dumps(components(), indent=1, sort_keys=True) + "\n"
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            sys.exit(f"{OUT} is out of date: run build/make_openapi_components.py")
        return
    OUT.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
