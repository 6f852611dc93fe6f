"""The one free-port helper of tests, the demo and the benchmarks."""

from __future__ import annotations

import socket
from typing import Literal


def free_port(kind: Literal["tcp", "udp"] = "tcp", *, even: bool = False) -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after; a race with another
    process is possible but rare). `even` for RTP, whose media ports are even by convention."""
    family = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    for _ in range(100):
        with socket.socket(socket.AF_INET, family) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not even or port % 2 == 0:
            return port
    raise RuntimeError(f"no free {'even ' if even else ''}{kind.upper()} port on 127.0.0.1")
