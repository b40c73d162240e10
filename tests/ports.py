"""Free TCP ports on 127.0.0.1 for the tests that start their own Ray head, Serve proxy or HAProxy."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the OS had free a moment ago: all sockets are bound before any is closed, so no two of
    them are the same port (binding one at a time could hand the same port out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One port the OS had free a moment ago."""
    return free_ports(1)[0]
