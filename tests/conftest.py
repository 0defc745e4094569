"""Shared pytest configuration: async tests run on anyio's asyncio backend (aiohttp needs it)."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
