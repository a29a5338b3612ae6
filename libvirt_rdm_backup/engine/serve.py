"""Serve a backup point read-only over NBD, without copying it: ``serve`` and ``mount``.

The point's layers (the qcow2 chain of a file repository, or the regions of an NBD
volume) are opened by a private ``qemu-storage-daemon`` as the store gives them
(:meth:`~libvirt_rdm_backup.engine.stores.Store.image_node`: every backing explicit,
headers checked or pinned) and exported read-only. Their digests are checked first
(as ``restore`` does) unless asked not to. While the point is served the store's
``reading`` gate is held: no prune of this host frees its layers meanwhile.
The listener is made as ``receive`` makes its own (:mod:`~libvirt_rdm_backup.targets.receive`):
a unix socket, or a TCP socket of ours handed to the daemon, with TLS and the
allowed client names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.engine.selection import choose_backup
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.engine.verify import lineage_problem, verify_lineage
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    NotFoundError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.ids import check_safe_name
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.sockets import tcp_listener
from libvirt_rdm_backup.targets import receive
from libvirt_rdm_backup.targets.uri import NbdAddress, parse_target

log = logging.getLogger(__name__)

NODE = "rdmb-point"
EXPORT_ID = receive.EXPORT_ID  # what receive.unexport takes down
NO_VERIFY_WARNING = "--no-verify: the layers' digests were not checked"


@dataclass(frozen=True)
class ServeRequest:
    """Which point to serve, and where: ``socket`` (a unix socket path) or ``listen``
    (``HOST:PORT``; port 0: any free port). ``tls_dir``: x509 credentials, for the
    TCP listener (``server-*.pem``) and for an ``nbds://`` target (``client-*.pem``).
    ``key_file``: the key of an encrypted point."""

    domain: str
    target: str
    disk: str
    backup_id: str | None = None
    socket: str | None = None
    listen: str | None = None
    tls_dir: str | None = None
    verify: bool = True
    key_file: str | None = None


@dataclass
class Served:
    """A point being served: where, what, and the daemon serving it."""

    uri: str
    backup_id: str
    domain: str
    disk: str
    size: int
    export: str
    verified: bool
    daemon: StorageDaemon

    def to_dict(self) -> dict[str, Any]:
        """The ``serve --json`` document."""
        return {"uri": self.uri, "backup_id": self.backup_id, "domain": self.domain,
                "disk": self.disk, "size": self.size, "export": self.export,
                "verified": self.verified}

    def check(self) -> None:
        """OperationError when the daemon no longer serves the point."""
        self.daemon.execute("query-block-exports")


def listener_config(request: ServeRequest) -> receive.ReceiveConfig:
    """Where to listen, as ``receive`` takes it (UsageError when malformed or unsafe)."""
    tls = request.tls_dir if request.listen is not None else None
    if request.socket is not None:
        check_socket_path(request.socket)
    listen, any_port = request.listen, False
    if listen is not None and listen.endswith(":0"):  # any free port: bound by tcp_listener
        listen, any_port = listen[:-2] + ":1", True
    address = receive.parse_listen(listen, request.socket, request.disk, tls=tls is not None)
    if any_port:
        address = dataclasses.replace(address, port=0)
    config = receive.ReceiveConfig(volume=f"{request.disk} of {request.domain}",
                                   address=address, tls_dir=tls)
    receive.check_listener(config)
    return config


def check_socket_path(path: str) -> None:
    """Refuse a socket path whose directory is missing, or where something else lives
    (the daemon would replace whatever is there); a stale socket is fine."""
    real = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(real)):
        raise UsageError(f"--socket {path}: directory {os.path.dirname(real)} does not exist")
    try:
        mode = os.lstat(real).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--socket {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(real)
        except OSError:
            return  # nobody listens: stale
    raise UsageError(f"--socket {path} is in use by another server")


def store_tls(request: ServeRequest) -> str | None:
    """The credentials the store gets: only an ``nbds://`` target takes them."""
    parsed = parse_target(request.target, allow_remote_plain=True)
    if isinstance(parsed, NbdAddress) and parsed.tls:
        return request.tls_dir
    if request.tls_dir is not None and request.listen is None:
        raise UsageError("--tls-creds applies to --listen and to nbds:// targets only")
    return None


def point_layers(store: Store, manifest: Manifest, disk: str, verify: bool) -> list[DiskPoint]:
    """The layers of the point, checked: digests (``verify``), else only the cheap checks
    (presence, size, headers, damage recorded before)."""
    if verify:
        return verify_lineage(store, manifest, disk)
    listed = store.scan(manifest.domain_uuid)
    damaged = {d.backup_id: d.problem for d in listed.damaged}
    points, problem = lineage_problem(listed.backups, damaged, manifest, disk, store.damage)
    if problem is not None:
        raise DamagedBackupError(manifest.backup_id, f"{problem}; nothing was served", disk)
    return points


@contextlib.contextmanager
def serve_point(request: ServeRequest) -> Iterator[Served]:
    """Serve the point until the block ends; then the export, the daemon and the unix
    socket are gone. Raises UsageError, NotFoundError (no such backup or disk),
    DamagedBackupError (a layer fails its check: nothing is served), OperationError."""
    check_safe_name(request.disk, "disk name")
    config = listener_config(request)
    tls = store_tls(request)
    with open_store(request.target, tls_dir=tls, key_file=request.key_file) as store, \
            contextlib.ExitStack() as stack:
        uuid = choose_backup(store, request.domain, request.backup_id).domain_uuid
        stack.enter_context(store.reading(uuid))  # no prune frees the layers meanwhile
        manifest = choose_backup(store, request.domain, request.backup_id)
        record = manifest.disk(request.disk)
        if record is None:
            raise NotFoundError(f"backup {manifest.backup_id} has no disk {request.disk!r}")
        points = point_layers(store, manifest, request.disk, request.verify)
        if not request.verify:
            log.warning("%s", NO_VERIFY_WARNING)
        node = {**store.image_node(points), "node-name": NODE, "read-only": True}
        daemon, address = _start(config)
        stack.callback(_remove_socket, address.socket)
        stack.enter_context(contextlib.closing(daemon))
        for item in store.qemu_objects():
            daemon.execute("object-add", item)
        daemon.execute("blockdev-add", node)
        daemon.execute("block-export-add", {"type": "nbd", "id": EXPORT_ID, "node-name": NODE,
                                            "name": address.export, "writable": False})
        stack.callback(_unexport, daemon)
        log.info("serving backup %s disk %s as %s", manifest.backup_id, request.disk,
                 address.uri)
        yield Served(uri=address.uri, backup_id=manifest.backup_id,
                     domain=manifest.domain_name, disk=request.disk, size=record.size,
                     export=address.export, verified=request.verify, daemon=daemon)


def _start(config: receive.ReceiveConfig) -> tuple[StorageDaemon, NbdAddress]:
    """The daemon with its NBD server listening (a client may connect once the export is
    added); the address with the port that was bound."""
    address = config.address
    clients = receive.allowed_clients(config)
    if address.socket is not None:
        daemon = StorageDaemon("serve").start()
        try:
            for item in receive.credential_objects(config, clients):
                daemon.execute("object-add", item)
            daemon.execute("nbd-server-start",
                           receive.nbd_server_arguments(config, bool(clients)))
            os.chmod(address.socket, 0o600)
        except BaseException:
            daemon.close()
            _remove_socket(address.socket)
            raise
        return daemon, address
    assert address.host is not None  # a TCP address has a host
    with tcp_listener(address.host, address.port) as listener:  # the daemon keeps a copy
        port = int(listener.getsockname()[1])
        daemon = StorageDaemon("serve", pass_fds=(listener.fileno(),),
                               arguments=receive.daemon_arguments(config, clients,
                                                                  listener.fileno())).start()
    return daemon, NbdAddress(export=address.export, host=address.host, port=port,
                              tls=address.tls)


def _unexport(daemon: StorageDaemon) -> None:
    """The export goes (its clients disconnected), then the server; best effort: the
    daemon is stopped next anyway."""
    with contextlib.suppress(RdmBackupError):
        receive.unexport(daemon)


def _remove_socket(path: str | None) -> None:
    """The unix socket the NBD server listened on (the daemon leaves it behind)."""
    if path is not None:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
