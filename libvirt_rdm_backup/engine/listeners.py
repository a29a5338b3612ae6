"""Where an export listens: ``--listen`` checked, unix listeners bound here and handed to
QEMU (:mod:`export`; its TCP listeners are :func:`~libvirt_rdm_backup.sockets.tcp_listener`)."""

from __future__ import annotations

import ipaddress
import os
import socket

from libvirt_rdm_backup.errors import OperationError, UsageError


def parse_listen(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (an IP address; port 0: any free port).

    Raises UsageError for a malformed address and, unless ``allow_remote``, for
    one that is not loopback (the export has neither TLS nor authentication).
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host) if sep else None
        port = int(port_text)
    except ValueError:
        address = None
        port = -1
    if address is None or not 0 <= port <= 65535:
        raise UsageError(f"--listen wants ADDRESS:PORT with an IP address, not {text!r}")
    if not address.is_loopback and not allow_remote:
        raise UsageError(f"refusing to listen on {address}: not a loopback address, and NBD "
                         "here has no TLS and no authentication (--allow-remote allows it)")
    return str(address), port


def unix_listener(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(16)
    except OSError as err:
        listener.close()
        raise OperationError(f"cannot listen on {path}: {err.strerror}") from err
    return listener
