"""Fixtures for the full-stack tests: plain imports from the fixture modules."""

from e2e.fixtures_cluster import cluster_with_node, control_plane, project_images  # noqa: F401
from e2e.fixtures_livekit import livekit, prometheus, sip  # noqa: F401
