"""Protocol front ends. Each decodes a wire request, calls the Engine, encodes the answer."""
