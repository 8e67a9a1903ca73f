"""Running a service whose features have not been built yet: health, reflection, UNIMPLEMENTED.

The generated base servicer answers every method with UNIMPLEMENTED, which is the honest answer
until the service's issue lands; health is SERVING so the mesh (and ``mt5mesh up``) can start.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.common.config import RuntimeConfig
from services.common.server import ServiceHost


async def serve_unimplemented(
    runtime: RuntimeConfig, service_name: str, register: Callable[[grpc.aio.Server], None]
) -> None:
    """Serve health and UNIMPLEMENTED methods until stopped."""
    host = ServiceHost(runtime, service_name)
    register(host.server)

    async def nothing() -> None:
        return None

    async def ready() -> bool:
        return True

    await host.run(warmup=nothing, ready=ready, cleanup=nothing)
