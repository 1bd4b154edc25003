"""A plugin that fails to import, as one does on a device that lacks its dependency."""

import appliance_plugin_missing_dependency  # type: ignore[import-not-found]  # noqa: F401

BrokenBackend = BrokenStep = None
