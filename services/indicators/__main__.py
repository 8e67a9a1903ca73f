"""Composition root: ``python -m services.indicators``."""

from __future__ import annotations

import os

from services.common.bootstrap import run_service
from services.indicators.config import IndicatorsConfig
from services.indicators.server import serve

if __name__ == "__main__":
    run_service(lambda: IndicatorsConfig.from_env(os.environ), lambda c: c.runtime, serve)
