"""Health of other mesh services, asked over grpc.health.v1 with a deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


class PeerHealth:
    """Checks named peers; channels are opened once and reused."""

    def __init__(self, peers: Mapping[str, str], *, deadline_seconds: float) -> None:
        self._deadline = deadline_seconds
        # Short reconnect backoff: a restarted peer should count as back within a second, not after
        # the default backoff of up to two minutes.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channels = {
            name: grpc.aio.insecure_channel(address, options=options) for name, address in peers.items()
        }
        self._stubs = {name: health_pb2_grpc.HealthStub(ch) for name, ch in self._channels.items()}

    async def _serving(self, name: str) -> bool:
        try:
            reply = await self._stubs[name].Check(
                health_pb2.HealthCheckRequest(), timeout=self._deadline, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("peer %s health check failed: %s", name, exc.code())
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> list[str]:
        """Names of the peers that are not SERVING right now, checked concurrently."""
        names = list(self._stubs)
        results = await asyncio.gather(*(self._serving(n) for n in names))
        return [n for n, ok in zip(names, results, strict=True) if not ok]

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))
