"""The mesh as users meet it: four real services behind the real Envoy gateway."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator

import httpx
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
    with helpers.postgres_database() if request.param == "postgresql" else sqlite as url:
        ports = {name: helpers.free_port() for name in helpers.SERVICES}
        extra = {
            "aggregator": {"AGGREGATOR_INGEST_ADDRESS": f"127.0.0.1:{ports['ingest']}"},
            "indicators": {"INDICATORS_AGGREGATOR_ADDRESS": f"127.0.0.1:{ports['aggregator']}"},
            "inference": {
                "INFERENCE_INDICATORS_ADDRESS": f"127.0.0.1:{ports['indicators']}",
                "INFERENCE_MODELS_DIR": str(workdir / "models"),
                "INFERENCE_RELOAD_SECONDS": "0.2",
                "INFERENCE_FEED_POLL_SECONDS": "0.1",
            },
        }
        others = {
            name: helpers.make_service(name, url, workdir, extra.get(name), port=ports[name])
            for name in helpers.SERVICES
            if name != "ingest"
        }
        peers = ",".join(f"{n}={s.address}" for n, s in others.items())
        ingest = helpers.make_service(
            "ingest", url, workdir, {"INGEST_MESH_PEERS": peers}, port=ports["ingest"]
        )
        services = {"ingest": ingest, **others}
        engine = db.create_db_engine(url)
        envoy = None
        try:
            for service in services.values():
                service.start(wait_serving=False)
            for service in services.values():
                service.wait_serving()
            envoy = helpers.start_envoy({n: s.port for n, s in services.items()}, workdir)
            helpers.wait_until(lambda: _healthy(envoy.url), 30, what="gateway /health 200")
            yield Mesh(services, envoy, engine, request.param, url, workdir / "models")
        finally:
            if envoy is not None:
                envoy.stop()
            for service in services.values():
                service.kill()
            engine.dispose()


def _healthy(url: str) -> bool:
    return httpx.get(url + "/health", timeout=5).status_code == 200
