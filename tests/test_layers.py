"""The request path is one straight line, each layer calling only the ones below it:

    api (fronts: codec + status mapping) -> request (lifecycle) -> routing
        -> pipelines (DAGs of models and steps) -> engine -> steps (processing around a model)
        -> guards (input rules, PII masking, output checks; used by steps and request)
        -> isolation (a model in a worker process, the first load in a child) -> backends

Checked from the source: no module imports a layer above its own, at run time or for typing
only (an import cycle hidden behind TYPE_CHECKING is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"
#: Top to bottom.
LAYERS = [
    "api", "request", "routing", "pipelines", "engine", "steps", "guards", "isolation",
    "backends",
]  # fmt: skip


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "appliance" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[str]:
    """Absolute names of the appliance modules `path` imports."""
    # Relative imports start from the module's package (a package's __init__: itself).
    here = ["appliance", *path.relative_to(PACKAGE).with_suffix("").parts][:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append(name)
            out.extend(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return [name for name in out if name.startswith("appliance")]


def _modules(layer: str) -> list[Path]:
    top = PACKAGE / layer
    return sorted(top.rglob("*.py")) if top.is_dir() else [PACKAGE / f"{layer}.py"]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_one_above_it(layer: str) -> None:
    above = set(LAYERS[: LAYERS.index(layer)])
    bad = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in _modules(layer)
        for name in _imports(path)
        if _layer(name) in above
    ]
    assert not bad, bad


def test_the_layers_exist() -> None:
    for layer in LAYERS:
        assert _modules(layer) and all(p.exists() for p in _modules(layer)), layer
