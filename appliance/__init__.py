"""appliance: an edge inference runtime."""

__version__ = "0.1.0"
