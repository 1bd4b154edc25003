"""Turning raw client data (images, text) into input tensors and outputs into answers.

A manifest's `preprocess` / `postprocess` objects name a `type`; one module here per type.
"""
