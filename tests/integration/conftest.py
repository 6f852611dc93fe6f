"""Fixtures for the integration tests: plain imports from the fixture modules."""

from e2e.fixtures_cluster import cluster_with_node, control_plane  # noqa: F401
from e2e.fixtures_livekit import livekit, prometheus, sip  # noqa: F401
from e2e.fixtures_providers import providers  # noqa: F401
