"""Regenerate the vendored KServe v2 / Triton gRPC message code in appliance/api/oip/.

    pip install grpcio-tools   # in any venv (build time only; it brings protoc)
    python build/gen_oip_stubs.py

The .proto files there are Triton's published ones (github.com/triton-inference-server/common,
protobuf/grpc_service.proto and model_config.proto, BSD-3-Clause), copied unchanged: their
`inference` package and message shapes are what tritonclient.grpc speaks. Only messages are
generated (`*_pb2.py` and `.pyi` stubs for mypy): the server registers its handlers itself
(api/grpc.py), so no generated servicer code pins a grpcio version.

Two edits after protoc, so the code lives inside the appliance package and beside any other
copy of the same protos (tritonclient's, in a test process) without a clash:
- `import model_config_pb2` becomes a relative import;
- the files go into a private descriptor pool (oip/_pool.py), not the process-wide default one,
  where a second `inference.ModelInferRequest` would be refused.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "appliance" / "api" / "oip"
PROTOS = ("model_config.proto", "grpc_service.proto")
#: (old, new); model_config imports nothing of its own, so the import edit may find nothing.
_IMPORT = ("import model_config_pb2 as", "from . import model_config_pb2 as")
_EDITS = {
    ".py": [
        _IMPORT,
        ("_descriptor_pool.Default().AddSerializedFile(", "POOL.AddSerializedFile("),
        (
            "# @@protoc_insertion_point(imports)",
            "# @@protoc_insertion_point(imports)\nfrom ._pool import POOL",
        ),
    ],
    ".pyi": [_IMPORT],
}


def main() -> int:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{OUT}",
            f"--python_out={OUT}", f"--pyi_out={OUT}", *PROTOS,
        ],
        check=True,
        cwd=OUT,
    )  # fmt: skip
    for proto in PROTOS:
        for suffix, edits in _EDITS.items():
            path = OUT / proto.replace(".proto", "_pb2" + suffix)
            text = path.read_text()
            for old, new in edits:
                if old in text:
                    text = text.replace(old, new)
                elif (old, new) != _IMPORT or proto == "grpc_service.proto":
                    raise SystemExit(f"{path.name}: {old!r} not found: protoc's output changed")
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
