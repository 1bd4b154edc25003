"""Pipelines: DAGs of models and steps, served like a model (declaration, checks, execution)."""
