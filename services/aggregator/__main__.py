"""Composition root: ``python -m services.aggregator``."""

from __future__ import annotations

import os

from services.aggregator.config import AggregatorConfig
from services.aggregator.server import serve
from services.common.bootstrap import run_service

if __name__ == "__main__":
    run_service(lambda: AggregatorConfig.from_env(os.environ), lambda c: c.runtime, serve)
