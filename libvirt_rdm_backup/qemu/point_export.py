"""Backup points served read-only over NBD on a unix socket by a private storage daemon.

The daemon (:class:`~libvirt_rdm_backup.qemu.storage_daemon.StorageDaemon`) dies with the
tool: what it serves is read from a store the tool holds open for reading, and a point
must not be served once nothing keeps a prune from changing it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon


@contextlib.contextmanager
def served_points(nodes: dict[str, dict[str, Any]], objects: tuple[dict[str, Any], ...],
                  socket_path: str, owner: tuple[int, int] | None) -> Iterator[StorageDaemon]:
    """Serve each of ``nodes`` (export name -> blockdev options of a point) read-only on
    ``socket_path``, which ``owner`` (uid, gid; None: root only) may connect to."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a server of an earlier run left it
    with StorageDaemon("live-restore") as daemon:
        for item in objects:
            daemon.execute("object-add", item)
        daemon.execute("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": socket_path}}, "max-connections": 0})
        try:
            if owner is not None:
                os.chown(socket_path, *owner)
            os.chmod(socket_path, 0o600)
        except OSError as err:
            raise OperationError(f"cannot hand the NBD socket to QEMU: {err.strerror}") from err
        for index, (name, node) in enumerate(sorted(nodes.items())):
            node_name = f"rdmb-point-{index}"
            daemon.execute("blockdev-add", {**node, "node-name": node_name, "read-only": True})
            daemon.execute("block-export-add", {"type": "nbd", "id": f"rdmb-export-{index}",
                                                "node-name": node_name, "name": name,
                                                "writable": False})
        try:
            yield daemon
        finally:
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
