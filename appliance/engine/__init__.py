"""The shared core: every protocol calls `Engine.infer`."""

from .engine import Engine, LoadedModel, ModelSource

__all__ = ["Engine", "LoadedModel", "ModelSource"]
