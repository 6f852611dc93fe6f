"""The one free-port helper of tests, the demo and the benchmarks."""

from __future__ import annotations

import itertools
import os
import socket
import threading
from typing import Literal

# Ports are handed out from below the kernel's ephemeral range (32768-60999 here), never from it.
# A port asked of the kernel with bind(0) comes from that range, and so does the local port of
# every outgoing connection: between handing one out and the worker binding it (seconds, while its
# process starts), any connection on the machine could take it. CI lost two runs that way
# ("address already in use" on a worker's health and metrics ports). Nothing the stack starts
# listens in this range (kube-router's 20244 is below it).
_RANGE = range(21000, 32000)
# Each process walks its own slice, so tests, the demo and a benchmark running side by side do
# not hand out the same ports; within a process a port is handed out again only after the walk
# wraps around its slice.
_SLICE = 1000
_start = _RANGE.start + (os.getpid() % (len(_RANGE) // _SLICE)) * _SLICE
_walk = itertools.cycle(range(_start, _start + _SLICE))
_walk_lock = threading.Lock()  # sipp calls pick their ports from threads


def _bindable(port: int, family: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, family) as probe:
        try:
            probe.bind(("0.0.0.0", port))  # all interfaces: how workers and servers bind
        except OSError:
            return False
    return True


def free_port(kind: Literal["tcp", "udp"] = "tcp", *, even: bool = False, block: int = 1) -> int:
    """A port free on every interface right now and outside the kernel's ephemeral range, so only
    a process that binds it on purpose can take it before the caller does. `even` for RTP, whose
    media ports are even by convention; `block` > 1 for a program that also binds the ports after
    it (sipp's media port is followed by RTCP and a video pair): all of them are free, and the
    next call hands out none of them."""
    family = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with _walk_lock:
        for _ in range(_SLICE):
            port = next(_walk)
            if even and port % 2:
                continue
            if port + block > _start + _SLICE:
                continue  # a block does not wrap around the slice
            if all(_bindable(p, family) for p in range(port, port + block)):
                for _ in range(block - 1):
                    next(_walk)
                return port
    raise RuntimeError(
        f"no {block} free {'even ' if even else ''}{kind.upper()} port(s) in "
        f"{_start}-{_start + _SLICE - 1}"
    )
