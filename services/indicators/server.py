"""Runs the indicators service: health and reflection; every RPC answers UNIMPLEMENTED for now."""

from __future__ import annotations

import grpc
from mt5.indicators.v1 import indicators_service_pb2_grpc as pb_grpc

from services.common.placeholder import serve_unimplemented
from services.indicators.config import SERVICE_NAME, IndicatorsConfig


def _register(server: grpc.aio.Server) -> None:
    pb_grpc.add_IndicatorsServiceServicer_to_server(pb_grpc.IndicatorsServiceServicer(), server)


async def serve(config: IndicatorsConfig) -> None:
    """Run until SIGTERM."""
    await serve_unimplemented(config.runtime, SERVICE_NAME, _register)
