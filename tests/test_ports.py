"""melcore.devtools.ports: free local ports for test servers and workers."""

import socket

import pytest

from melcore.devtools.ports import free_port, free_ports


def test_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports + [free_port()]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if it were still taken


def test_asking_for_no_port_is_refused():
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        free_ports(0)
