"""Composition root: ``python -m services.inference``."""

from __future__ import annotations

import os

from services.common.bootstrap import run_service
from services.inference.config import InferenceConfig
from services.inference.server import serve

if __name__ == "__main__":
    run_service(lambda: InferenceConfig.from_env(os.environ), lambda c: c.runtime, serve)
