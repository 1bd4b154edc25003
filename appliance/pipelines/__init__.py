"""Pipelines: DAGs of models and steps served as a model (issue 16).

declaration.py parses and checks a declaration and binds it to the models; executor.py runs a
request through it (fan-out, gather, conditions); served.py is the set a server serves, which
the router consults before the engine. This layer sits between routing and the engine.
"""

from .served import BACKEND, FILE_NAME, Pipelines, read_declaration

__all__ = ["BACKEND", "FILE_NAME", "Pipelines", "read_declaration"]
