"""Shared pytest configuration: async tests run on anyio's asyncio backend (aiohttp needs it).

``pg_server`` is a real PostgreSQL server (tests/pg.py), started once per session when a test
first needs it; ``pg_url`` is a fresh, empty database on it for one test.
"""

from collections.abc import Iterator

import pytest
from pg import PgServer, running_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    yield from running_server()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.new_database()
