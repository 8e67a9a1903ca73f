"""Runs the inference service: health and reflection; every RPC answers UNIMPLEMENTED for now."""

from __future__ import annotations

import grpc
from mt5.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.common.placeholder import serve_unimplemented
from services.inference.config import SERVICE_NAME, InferenceConfig


def _register(server: grpc.aio.Server) -> None:
    pb_grpc.add_InferenceServiceServicer_to_server(pb_grpc.InferenceServiceServicer(), server)


async def serve(config: InferenceConfig) -> None:
    """Run until SIGTERM."""
    await serve_unimplemented(config.runtime, SERVICE_NAME, _register)
