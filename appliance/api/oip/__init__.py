"""KServe v2 / Triton gRPC messages: Triton's published .proto files and the code protoc made
from them (regenerate with build/gen_oip_stubs.py; do not edit the *_pb2 files by hand)."""
