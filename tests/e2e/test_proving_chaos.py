"""Proving ground, crash and resume: short forms of ``bench/proving/chaos.py`` (the full form is
``make proving-ground``).

A client streams ticks of three symbols with source sequence numbers through the real Envoy gateway
into the four real services on PostgreSQL while (1) every process of the mesh is SIGKILLed once at
a random moment and restarted, or (2) PostgreSQL itself (a throwaway cluster) is restarted with
``pg_ctl restart -m immediate``. Afterwards: every acknowledged tick stored exactly once, candles
equal to the pandas reference, indicators equal to batch TA-Lib, one signal per final candle with a
complete feature row, scored as offline; and in (2) every service said NOT_SERVING while the
database was down and SERVING again after.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from bench.proving.chaos import (
    TARGETS,
    Plan,
    RunReport,
    postgres_restart_run,
    postgres_tools_missing,
    service_kill_run,
)
from tests.helpers import postgres_database
from tests.pipeline_checks import Mismatches

pytestmark = [pytest.mark.envoy, pytest.mark.postgres]

SHORT = Plan(
    ticks=18_000,
    kills=len(TARGETS),
    seed=3,
    symbols=("EURUSD", "GBPUSD", "USDJPY"),
    batch_size=200,
    tick_seconds=1.5,
    rate=2_000.0,
    postgres_restarts=1,
    settle_timeout=60.0,
)


def assert_everything_once_and_equal_to_offline(run: RunReport) -> None:
    checks = run.checks
    assert run.client_error is None, run.describe()
    assert run.ticks_acked == run.ticks_sent
    assert checks.failures() == [], run.describe()
    assert checks.ticks_stored == checks.source_batch_ticks == run.ticks_sent
    assert checks.candles == Mismatches(0, 0, 0)
    assert checks.indicators == Mismatches(0, 0, 0)
    assert checks.signals_expected > 0
    assert run.settled
    assert all(run.processes_alive.values()), run.processes_alive
    assert not any(kill.crashed_on_start for kill in run.kills), run.describe()


async def test_mesh_every_process_killed_midstream_stores_each_acknowledged_tick_once(
    tmp_path: pathlib.Path,
) -> None:
    with postgres_database() as url:
        run = await service_kill_run(SHORT, url, tmp_path)
    assert run.kills_per_service == dict.fromkeys(TARGETS, 1)
    assert run.reconnects > 0  # the client did ride out the ingest and Envoy kills
    assert_everything_once_and_equal_to_offline(run)


async def test_mesh_postgres_restarted_midstream_reports_not_serving_and_loses_nothing(
    tmp_path: pathlib.Path,
) -> None:
    reason = postgres_tools_missing()
    if reason is not None:
        pytest.skip(f"no throwaway PostgreSQL cluster here: {reason}")
    run = await postgres_restart_run(dataclasses.replace(SHORT, kills=0, ticks=12_000), tmp_path)
    (restart,) = run.restarts
    for name in ("ingest", "aggregator", "indicators", "inference"):
        health = restart.health[name]
        assert health["not_serving_seen"], (name, health)
        assert health["serving_at_end"], (name, health)
    assert_everything_once_and_equal_to_offline(run)
