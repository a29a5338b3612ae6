"""Listening TCP sockets that QEMU serves NBD on (``export``, ``receive``).

The tool binds the socket and hands it to QEMU, so that it is made one way:
with ``TCP_NODELAY``, which the connections it accepts inherit (Linux). QEMU's
NBD server leaves Nagle's algorithm on for the connections it accepts itself:
its small replies then wait for the client's delayed acknowledgement, about
10 ms per write request (a copy job writing 64 KiB chunks over TCP ran several
times slower than into a file).
"""

from __future__ import annotations

import socket

from libvirt_rdm_backup.errors import OperationError


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (an IPv4 or IPv6 address, or a name: its first
    address that binds) and ``port`` (0: any free port), with ``SO_REUSEADDR`` and
    ``TCP_NODELAY``. OperationError naming the address when it cannot listen."""
    where = host_port(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OperationError(f"cannot listen on {where}: {err.strerror}") from err
    problem = "no address"
    for family, kind, proto, _name, sockaddr in infos:
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            listener.bind(sockaddr)
            listener.listen(socket.SOMAXCONN)
        except OSError as err:
            listener.close()
            problem = str(err.strerror)
            continue
        return listener
    raise OperationError(f"cannot listen on {where}: {problem}")
