"""Free local TCP ports for test servers, workers and benchmarks (``free_port``, ``free_ports``)."""

from __future__ import annotations

import contextlib
import socket

__all__ = ["free_port", "free_ports"]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports on ``host`` that nothing listened on a moment ago.

    All ``n`` sockets are bound at once, so the ports differ from each other; they are closed
    before returning, so another process may take one in between (fine for tests on one machine).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listened on a moment ago."""
    return free_ports(1, host)[0]
