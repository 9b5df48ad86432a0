"""Generates the Python stubs of `proto/inference.proto` with grpcio-tools.

    python -m jaxinfer.serving.protogen          # rewrites jaxinfer/serving/proto/inference_pb2*.py(i)

The proto is compiled from the repository root, so the stubs import each other as
`jaxinfer.serving.proto.inference_pb2`. The generated code names the grpcio-tools and protobuf
versions that made it, and needs a grpcio / protobuf runtime at least that new: the `serve` extra
pins them (see pyproject.toml).
"""

from __future__ import annotations

import pathlib
import sys

PROTO = "jaxinfer/serving/proto/inference.proto"
ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository root
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(out_root: str | pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Compiles the proto into `out_root`/jaxinfer/serving/proto/; returns the generated files."""
    from grpc_tools import protoc

    out_root = pathlib.Path(out_root)
    (out_root / PROTO).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / PROTO.rsplit("/", 1)[0] / name for name in OUTPUTS]


if __name__ == "__main__":
    for path in generate():
        print(path, file=sys.stderr)
