"""A protoc plugin that generates gRPC Python stubs with grpcio-tools' bundled generator.

buf runs plugins as separate executables, but the gRPC Python generator ships only inside
``grpc_tools.protoc``. This plugin takes buf's CodeGeneratorRequest, hands the already-parsed
descriptors to that protoc with ``--descriptor_set_in`` and ``--grpc_python_out``, and answers
with the files it wrote. No network, no registry.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    """Run grpc_tools' generator over the request's files and collect its output."""
    response = plugin_pb2.CodeGeneratorResponse()
    response.supported_features = plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        descriptor_set = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
        (root / "set.binpb").write_bytes(descriptor_set.SerializeToString())
        out = root / "out"
        out.mkdir()
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={root / 'set.binpb'}",
            f"--grpc_python_out={out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed on " + ", ".join(request.file_to_generate)
            return response
        for path in sorted(out.rglob("*.py")):
            generated = response.file.add()
            generated.name = path.relative_to(out).as_posix()
            generated.content = path.read_text()
    return response


def main() -> None:
    """Read a CodeGeneratorRequest from stdin and write the CodeGeneratorResponse to stdout."""
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
