"""`appliance build`: turn a Hugging Face model folder into a served, validated model version.

Build-time only: the exporters (optimum-onnx, torch, transformers) run in a converter Python
by subprocess and are never imported here, so the device binary never carries them.
"""
