"""The mesh as users meet it: four real services behind the real Envoy gateway."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select

from services.common import db
from services.common.schema import ingest_candles, ingest_ticks
from tests import helpers


@dataclasses.dataclass
class Mesh:
    """Running services, the gateway in front of them, and the database behind them."""

    services: dict[str, helpers.ServiceProcess]
    envoy: helpers.EnvoyProcess
    engine: Engine
    backend: str
    database_url: str
    models_dir: pathlib.Path

    @property
    def url(self) -> str:
        return self.envoy.url

    def count_candles(self, symbol: str) -> int:
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(ingest_candles).where(ingest_candles.c.symbol == symbol)
            return int(conn.execute(query).scalar_one())

    def count_ticks(self, symbol: str) -> int:
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(ingest_ticks).where(ingest_ticks.c.symbol == symbol)
            return int(conn.execute(query).scalar_one())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp(f"mesh-{request.param}")
    sqlite = contextlib.nullcontext(helpers.sqlite_url(workdir))
    database = helpers.postgres_database() if request.param == "postgresql" else sqlite
    with database as url, helpers.running_mesh(url, workdir) as running:
        engine = db.create_db_engine(url)
        try:
            yield Mesh(running.services, running.envoy, engine, request.param, url, running.models_dir)
        finally:
            engine.dispose()
