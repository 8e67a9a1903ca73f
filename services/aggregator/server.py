"""Runs the aggregator service: health and reflection; every RPC answers UNIMPLEMENTED for now."""

from __future__ import annotations

import grpc
from mt5.aggregator.v1 import aggregator_service_pb2_grpc as pb_grpc

from services.aggregator.config import SERVICE_NAME, AggregatorConfig
from services.common.placeholder import serve_unimplemented


def _register(server: grpc.aio.Server) -> None:
    pb_grpc.add_AggregatorServiceServicer_to_server(pb_grpc.AggregatorServiceServicer(), server)


async def serve(config: AggregatorConfig) -> None:
    """Run until SIGTERM."""
    await serve_unimplemented(config.runtime, SERVICE_NAME, _register)
