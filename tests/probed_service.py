"""A service process that also reports its own asyncio tasks and threads on its metrics port.

``python -m tests.probed_service aggregator`` runs exactly what ``python -m services.aggregator`` runs,
plus two gauges the proving-ground tests and benchmarks read to tell a leak from a steady state:
``mt5_probe_asyncio_tasks`` (tasks alive on the service's event loop) and ``mt5_probe_threads``.
Nothing in the service is changed; the gauges are computed when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Gauge

from services.common.bootstrap import run_service

CONFIGS = {
    "ingest": ("services.ingest.config", "IngestConfig"),
    "aggregator": ("services.aggregator.config", "AggregatorConfig"),
    "indicators": ("services.indicators.config", "IndicatorsConfig"),
    "inference": ("services.inference.config", "InferenceConfig"),
}

TASKS = Gauge("mt5_probe_asyncio_tasks", "asyncio tasks alive on the service's event loop (test probe).")
THREADS = Gauge("mt5_probe_threads", "Threads of the service process (test probe).")


def _count_tasks(loop: asyncio.AbstractEventLoop) -> int:
    # all_tasks reads a WeakSet the loop thread may change meanwhile; it retries on its own.
    return len(asyncio.all_tasks(loop))


def probed(serve: Callable[[Any], Coroutine[Any, Any, None]]) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """``serve`` with the probe gauges bound to the loop it runs on."""

    async def run(config: Any) -> None:
        loop = asyncio.get_running_loop()
        TASKS.set_function(lambda: _count_tasks(loop))
        THREADS.set_function(threading.active_count)
        await serve(config)

    return run


def main(name: str) -> None:
    module, class_name = CONFIGS[name]
    config_class = getattr(importlib.import_module(module), class_name)
    serve = importlib.import_module(f"services.{name}.server").serve
    run_service(lambda: config_class.from_env(os.environ), lambda c: c.runtime, probed(serve))


if __name__ == "__main__":
    main(sys.argv[1])
