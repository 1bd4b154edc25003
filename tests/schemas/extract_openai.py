"""Cut the OpenAI OpenAPI document down to the routes the appliance serves (openai_v1.json).

    python tests/schemas/extract_openai.py openapi.json COMMIT > tests/schemas/openai_v1.json

Keeps the operations of /chat/completions (POST), /completions, /embeddings, /models and
/models/{model} (GET), and every component schema they reach through `$ref`; drops prose
(`description`, `example(s)`, `x-oaiMeta`) so the file stays small. Nothing else changes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

ROUTES = {
    "/chat/completions": ["post"],
    "/completions": ["post"],
    "/embeddings": ["post"],
    "/models": ["get"],
    "/models/{model}": ["get"],
}
PROSE = {"description", "example", "examples", "x-oaiMeta", "summary"}


def strip(node: Any, in_properties: bool = False) -> Any:
    """The node without prose keywords (a property that is *named* `description` stays)."""
    if isinstance(node, dict):
        return {
            k: strip(v, k == "properties" and not in_properties)
            for k, v in node.items()
            if in_properties or k not in PROSE
        }
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                out.add(v.rsplit("/", 1)[-1])
            else:
                refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def main(path: str, commit: str) -> None:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    paths = {p: {m: spec["paths"][p][m] for m in methods} for p, methods in ROUTES.items()}
    schemas = spec["components"]["schemas"]
    todo: set[str] = set()
    refs(paths, todo)
    keep: set[str] = set()
    while todo:
        name = todo.pop()
        if name in keep or name not in schemas:
            continue
        keep.add(name)
        refs(schemas[name], todo)
    out = {
        "openapi": spec["openapi"],
        "info": {
            "title": spec["info"]["title"],
            "version": spec["info"]["version"],
            "x-source": f"github.com/openai/openai-openapi openapi.json at {commit}, cut down "
            "by tests/schemas/extract_openai.py",
            "license": {"name": "MIT", "url": "https://github.com/openai/openai-openapi"},
        },
        "paths": strip(paths),
        "components": {"schemas": {n: strip(schemas[n]) for n in sorted(keep)}},
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
