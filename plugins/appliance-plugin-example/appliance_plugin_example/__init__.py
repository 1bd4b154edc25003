"""An example appliance plugin: the `clip` step and the `linear` backend.

Nothing is imported here: the appliance imports `clip` or `linear` only when a model names
them (the entry points in pyproject.toml say where they are)."""

__version__ = "0.1.0"
