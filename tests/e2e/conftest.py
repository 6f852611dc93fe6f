"""Fixtures for the full-stack tests: plain imports from the fixture modules."""

from voicefleet_localdev.pytest_plugin import (  # noqa: F401  # noqa: F401
    cluster_with_node,
    control_plane,
    livekit,
    project_images,
    prometheus,
    s3,
    sip,
)
