"""pytest fixture for the local provider servers (OpenAI-compatible, see e2e/providers).

`providers`: a fresh `ProviderServer` on a free loopback port for each test, so scripts and
recorded requests never leak between tests. Point the plugins at `providers.base_url`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from e2e.providers import ProviderServer

__all__ = ["providers"]


@pytest_asyncio.fixture
async def providers() -> AsyncIterator[ProviderServer]:
    async with ProviderServer() as server:
        yield server
