"""Shared fixtures: databases (SQLite file and a dedicated PostgreSQL database) and real processes."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests import helpers


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """Each test using this runs twice: on an SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield helpers.sqlite_url(tmp_path)
    else:
        with helpers.postgres_database() as url:
            yield url
