"""Runs the whole mesh as child processes in the foreground and stops it cleanly.

Each child is the same entry point Kubernetes runs (``python -m services.<name>``, ``envoy -c``),
so what runs locally is what runs in production, only on loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import urllib.request
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Child:
    """A process to run: its name, command line, environment, and how to tell it is ready."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    grpc_health: str | None = None  # "host:port" answering grpc.health.v1
    http_ready: str | None = None  # URL answering 200 when ready


class Supervisor:
    """Starts children, waits until all are ready, and stops them all on a signal or a crash."""

    def __init__(self, children: Sequence[Child], *, stop_grace_seconds: float = 15.0) -> None:
        self._children = children
        self._grace = stop_grace_seconds
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()

    async def run(self, on_ready: str, *, ready_timeout: float = 120.0) -> int:
        """Run until a signal (exit 0) or a child's death (exit 1); print ``on_ready`` once ready."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            for child in self._children:
                self._procs[child.name] = await asyncio.create_subprocess_exec(
                    *child.argv, env={**os.environ, **child.env}
                )
                logger.info("started %s (pid %d)", child.name, self._procs[child.name].pid)
            watchers = [asyncio.create_task(self._watch(name, proc)) for name, proc in self._procs.items()]
            ready = asyncio.create_task(self._wait_ready(ready_timeout))
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([ready, stop, *watchers], return_when=asyncio.FIRST_COMPLETED)
            if ready in done and ready.result():
                print(on_ready, flush=True)
                done, _ = await asyncio.wait([stop, *watchers], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            failed = stop not in done
            for task in (stop, *watchers):
                task.cancel()
            return 1 if failed else 0
        finally:
            await self._stop_all()

    async def _watch(self, name: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if not self._stop.is_set():
            logger.error("%s exited with code %s; stopping the mesh", name, code)

    async def _wait_ready(self, within: float) -> bool:
        async def all_ready() -> None:
            for child in self._children:
                # Polling: readiness is another process's state, there is nothing to await on.
                while not await _is_ready(child):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)

        try:
            await asyncio.wait_for(all_ready(), within)
        except TimeoutError:
            logger.error("the mesh was not ready within %.0fs", within)
            return False
        return True

    async def _stop_all(self) -> None:
        # Reverse order: the gateway stops taking requests before the services behind it drain.
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for name, proc in self._procs.items():
            try:
                await asyncio.wait_for(proc.wait(), self._grace)
            except TimeoutError:
                logger.warning("%s did not stop within %.0fs; killing it", name, self._grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def _is_ready(child: Child) -> bool:
    if child.grpc_health:
        try:
            async with grpc.aio.insecure_channel(child.grpc_health) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
        except grpc.aio.AioRpcError:
            return False
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return False
    if child.http_ready:
        return await asyncio.to_thread(_http_ok, child.http_ready)
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - a loopback admin URL we built
            return bool(response.status == 200)
    except OSError:
        return False
