"""Local infrastructure built from upstream sources: cluster, LiveKit stack, images."""
