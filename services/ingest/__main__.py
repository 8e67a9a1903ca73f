"""Composition root: ``python -m services.ingest``."""

from __future__ import annotations

import os

from services.common.bootstrap import run_service
from services.ingest.config import IngestConfig
from services.ingest.server import serve

if __name__ == "__main__":
    run_service(lambda: IngestConfig.from_env(os.environ), lambda c: c.runtime, serve)
