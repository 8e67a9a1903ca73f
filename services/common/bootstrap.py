"""The entry point every service's ``__main__`` uses: config errors are one clear line, not a trace."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from services.common.config import RuntimeConfig
from services.common.env import ConfigError
from services.common.logs import configure_logging
from services.common.telemetry import configure_tracing

C = TypeVar("C")


def run_service(
    load: Callable[[], C],
    runtime: Callable[[C], RuntimeConfig],
    serve: Callable[[C], Coroutine[Any, Any, None]],
) -> None:
    """Read the config, set up logs and traces, and serve until stopped."""
    try:
        config = load()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None
    rt = runtime(config)
    configure_logging(rt.service_name, rt.log_level)
    provider = configure_tracing(rt.service_name, rt.otlp_endpoint)
    try:
        asyncio.run(serve(config))
    finally:
        if provider is not None:
            provider.shutdown()
        logging.shutdown()
