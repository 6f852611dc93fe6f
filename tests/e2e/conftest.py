"""Fixtures for the full-stack tests: the platform's from the local-platform plugin, and the
provider servers on the host address that pods reach."""

from collections.abc import AsyncIterator

import pytest_asyncio
from voicefleet_localdev.pytest_plugin import (  # noqa: F401
    ClusterHandle,
    cluster_with_node,
    control_plane,
    livekit,
    project_images,
    prometheus,
    s3,
    sip,
)
from voicefleet_testkit.providers import ProviderServer


@pytest_asyncio.fixture(loop_scope="session")
async def pod_providers(cluster_with_node: ClusterHandle) -> AsyncIterator[ProviderServer]:  # noqa: F811
    """The provider servers (OpenAI, Deepgram, ElevenLabs) on the host address pods reach."""
    async with ProviderServer(cluster_with_node.host_address_from_pods, 0) as server:
        yield server
