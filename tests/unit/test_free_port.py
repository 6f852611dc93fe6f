"""Test-kit free ports: outside the kernel's ephemeral range, never handed out twice."""

from __future__ import annotations

import socket
from pathlib import Path

from voicefleet_testkit.net import free_port


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_ports_are_outside_the_ephemeral_range_and_distinct() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(not low <= port <= high for port in ports), ports
    assert len(set(ports)) == len(ports)


def test_a_port_held_by_another_socket_is_skipped() -> None:
    taken = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", taken + 1))
        holder.listen()
        following = free_port()
    assert following not in (taken, taken + 1)


def test_even_udp_ports_for_rtp() -> None:
    port = free_port("udp", even=True)
    assert port % 2 == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp:
        rtp.bind(("0.0.0.0", port))


def test_a_block_is_free_and_not_handed_out_again() -> None:
    media = free_port("udp", even=True, block=4)
    assert media % 2 == 0
    after = free_port("udp")
    assert not media <= after < media + 4
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for offset, sock in enumerate(sockets):
            sock.bind(("0.0.0.0", media + offset))
    finally:
        for sock in sockets:
            sock.close()
