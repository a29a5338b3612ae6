"""The backup-server side of NBD targets: serve a backup volume with qemu-storage-daemon.

``rdm-backup receive`` keeps one sparse volume file and serves it as one NBD
export of a private ``qemu-storage-daemon`` (:mod:`~libvirt_rdm_backup.qemu.storage_daemon`);
backups pushed into it (``backup --target nbd://...``) are complete repositories
that ``list``, ``verify`` and ``restore`` read from the same address. The address
is announced only once the export exists: a client may connect at once.
One writer at a time: backups take the writer lease kept in the volume itself
(:mod:`nbd_volume`), and one ``receive`` at a time serves a volume file.
No listener on a non-loopback address without TLS unless explicitly allowed;
with TLS, only clients whose certificate has an allowed distinguished name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from libvirt_rdm_backup.errors import CommandError, OperationError, UsageError
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.process import require_tool, run
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon
from libvirt_rdm_backup.sockets import tcp_listener
from libvirt_rdm_backup.targets.uri import DEFAULT_NBD_PORT, NbdAddress, parse_target

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 40  # a sparse TiB: only what backups write takes space
CLIENT_CERT = "client-cert.pem"  # in --tls-creds DIR: the client allowed by default
NODE = "rdmb-volume"
EXPORT_ID = "rdmb-export"
TLS_ID = "rdmb-tls"
AUTHZ_ID = "rdmb-authz"
STOP_TIMEOUT = 30.0  # seconds the export gets to let its clients go when stopping


@dataclass(frozen=True)
class ReceiveConfig:
    """What ``receive`` serves, and where; ``client_dns``: the distinguished names of the
    client certificates allowed (TLS only; empty: the default of :func:`allowed_clients`)."""

    volume: str
    address: NbdAddress
    size: int = DEFAULT_SIZE
    tls_dir: str | None = None
    allow_plain_remote: bool = False
    client_dns: tuple[str, ...] = ()


def parse_listen(listen: str | None, socket_path: str | None, export: str,
                 tls: bool) -> NbdAddress:
    """The address to serve on: ``HOST:PORT`` or a unix socket path."""
    if (listen is None) == (socket_path is None):
        raise UsageError("give exactly one of --listen HOST:PORT and --socket PATH")
    if socket_path is not None:
        return NbdAddress(export=export, socket=os.path.abspath(socket_path))
    host, _, port = str(listen).rpartition(":")
    if not host:
        host, port = str(listen), str(DEFAULT_NBD_PORT)
    scheme = "nbds" if tls else "nbd"
    parsed = parse_target(f"{scheme}://{host}:{port}/{export}", allow_remote_plain=True)
    assert isinstance(parsed, NbdAddress)
    return parsed


def check_listener(config: ReceiveConfig) -> None:
    """Refuse (UsageError) what must not be served: plain NBD off loopback unless allowed,
    client names without TLS."""
    address = config.address
    if not address.is_loopback and config.tls_dir is None and not config.allow_plain_remote:
        raise UsageError(f"serving NBD on {address.host} without TLS would expose backups "
                         "unencrypted; give --tls-creds DIR, or --allow-plain-remote")
    if config.client_dns and config.tls_dir is None:
        raise UsageError("--allow-client-dn needs --tls-creds: without TLS clients are not "
                         "identified")
    for name in config.client_dns:
        if not name.strip() or any(ord(char) < 32 for char in name):
            raise UsageError(f"not a distinguished name: {name!r}")


def allowed_clients(config: ReceiveConfig) -> tuple[str, ...]:
    """The client certificate names (DNs) allowed with TLS: ``config.client_dns``, else the
    DN of ``client-cert.pem`` in the credentials directory. Empty: any client whose
    certificate the CA signed (no such file there), or no TLS at all."""
    if config.tls_dir is None:
        return ()
    if config.client_dns:
        return config.client_dns
    path = os.path.join(config.tls_dir, CLIENT_CERT)
    if not os.path.isfile(path):
        log.info("no %s in %s: every client certificate signed by the CA is allowed",
                 CLIENT_CERT, config.tls_dir)
        return ()
    return (certificate_dn(path),)


def certificate_dn(path: str) -> str:
    """The subject of the PEM certificate at ``path`` as QEMU names a TLS client: RFC 4514
    escaping, in the certificate's order (``C=GB,O=Example,CN=backup1``), UTF-8 as is.
    Read with ``openssl``; UsageError when unreadable."""
    try:
        out = run([require_tool("openssl"), "x509", "-noout", "-subject", "-nameopt",
                   "RFC2253,-dn_rev,-esc_msb", "-in", path], timeout=30).stdout.strip()
    except CommandError as err:
        raise UsageError(f"cannot read the certificate {path}: {err}") from err
    subject = out.removeprefix("subject=").strip()
    if not subject or "\n" in subject:
        raise UsageError(f"cannot read the subject of the certificate {path}")
    return subject


def nbd_server_arguments(config: ReceiveConfig, authz: bool) -> dict[str, Any]:
    """``nbd-server-start`` arguments: the address, TLS, any number of clients (the writer
    lease in the volume keeps writers to one at a time; readers are served alongside)."""
    address = config.address
    if address.socket is not None:
        addr: dict[str, Any] = {"type": "unix", "data": {"path": address.socket}}
    else:
        addr = {"type": "inet", "data": {"host": str(address.host), "port": str(address.port)}}
    arguments: dict[str, Any] = {"addr": addr, "max-connections": 0}
    if config.tls_dir is not None:
        arguments["tls-creds"] = TLS_ID
        if authz:
            arguments["tls-authz"] = AUTHZ_ID
    return arguments


def volume_node(path: str) -> dict[str, Any]:
    """``blockdev-add`` of the volume: raw, through the host page cache with flushes
    honoured (what a client's flush has made durable survives a crash of the server),
    discards and zero writes punching holes."""
    try:
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError as err:
        raise OperationError(f"cannot open volume {path}: {err.strerror}") from err
    cache = {"direct": False, "no-flush": False}
    return {"driver": "raw", "node-name": NODE, "discard": "unmap", "detect-zeroes": "unmap",
            "cache": cache,
            "file": {"driver": "host_device" if is_device else "file", "filename": path,
                     "discard": "unmap", "cache": cache}}


def credential_objects(config: ReceiveConfig, clients: tuple[str, ...]) -> list[dict[str, Any]]:
    """The objects the NBD server refers to: TLS credentials and the allowed clients."""
    if config.tls_dir is None:
        return []
    objects: list[dict[str, Any]] = [{"qom-type": "tls-creds-x509", "id": TLS_ID,
                                      "endpoint": "server", "verify-peer": True,
                                      "dir": os.path.abspath(config.tls_dir)}]
    if clients:
        objects.append({"qom-type": "authz-list", "id": AUTHZ_ID, "policy": "deny",
                        "rules": [{"match": name, "policy": "allow", "format": "exact"}
                                  for name in clients]})
    return objects


def daemon_arguments(config: ReceiveConfig, clients: tuple[str, ...],
                     listener: int) -> list[str]:
    """Command-line options that start the NBD server on ``listener`` (an inherited socket:
    its ``addr`` of type ``fd`` is accepted on the command line only, not over QMP)."""
    arguments: list[str] = []
    for item in credential_objects(config, clients):
        arguments += ["--object", json.dumps(item)]
    server = nbd_server_arguments(config, bool(clients))
    server["addr"] = {"type": "fd", "str": str(listener)}
    return [*arguments, "--nbd-server", json.dumps(server)]


def export(daemon: StorageDaemon, config: ReceiveConfig, clients: tuple[str, ...],
           server_started: bool = False) -> None:
    """Serve the volume from ``daemon``: credentials, the NBD server (unless
    ``server_started`` from the command line), the node, the export."""
    if not server_started:
        for item in credential_objects(config, clients):
            daemon.execute("object-add", item)
        daemon.execute("nbd-server-start", nbd_server_arguments(config, bool(clients)))
    daemon.execute("blockdev-add", volume_node(config.volume))
    daemon.execute("block-export-add", {"type": "nbd", "id": EXPORT_ID, "node-name": NODE,
                                        "name": config.address.export, "writable": True})


def unexport(daemon: StorageDaemon) -> None:
    """Stop serving: the export (its clients disconnected) and the NBD server."""
    daemon.execute("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
    daemon.wait_export_deleted(EXPORT_ID, STOP_TIMEOUT)
    daemon.execute("nbd-server-stop")


def ensure_volume(path: str, size: int) -> None:
    """Create the sparse volume file (0600), or grow an existing one to ``size``.

    A volume never shrinks: a smaller ``size`` leaves an existing one as it is.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _grow(path, size)
        return
    except OSError as err:
        raise OperationError(f"cannot create volume {path}: {err.strerror}") from err
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _grow(path: str, size: int) -> None:
    """Make an existing regular volume file at least ``size`` bytes (devices stay as they are)."""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size < size:
            log.info("growing volume %s from %d to %d bytes", path, info.st_size, size)
            os.truncate(path, size)
    except OSError as err:
        raise OperationError(f"cannot grow volume {path}: {err.strerror}") from err


def serve(config: ReceiveConfig, ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then return 0.

    The volume file is locked (``flock``) while served: a second ``receive`` of
    it fails (OperationError) instead of serving it beside the first. ``ready``
    is called once the export exists (clients can connect). OperationError when
    the daemon cannot serve, or stops serving on its own.
    """
    check_listener(config)
    clients = allowed_clients(config)
    ensure_volume(config.volume, config.size)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(config.volume,
                                          f"volume {config.volume} is already being served"))
        except OSError as err:
            raise OperationError(f"cannot lock volume {config.volume}: {err.strerror}") from err
        with contextlib.suppress(_Stopped), _stop_signals():
            _serve(config, clients, ready)
    return 0


class _Stopped(BaseException):
    """SIGINT or SIGTERM arrived: stop serving (unwinds like KeyboardInterrupt)."""


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise _Stopped, the first one only (cleanup is not interrupted)."""
    raised: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        if not raised:
            raised.append(signum)
            raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(config: ReceiveConfig, clients: tuple[str, ...],
           ready: Callable[[], None] | None) -> None:
    """Serve until a signal (_Stopped); OperationError when the daemon stops on its own.

    On TCP the daemon listens on a socket of ours, with ``TCP_NODELAY``
    (:func:`~libvirt_rdm_backup.sockets.tcp_listener`)."""
    if config.address.socket is None:
        assert config.address.host is not None  # a TCP address has a host
        # the daemon keeps its own copy of the listening socket
        with tcp_listener(config.address.host, config.address.port) as listener:
            daemon = StorageDaemon("receive", pass_fds=(listener.fileno(),),
                                   arguments=daemon_arguments(config, clients,
                                                              listener.fileno())).start()
    else:
        daemon = StorageDaemon("receive").start()
    with contextlib.closing(daemon):
        try:
            export(daemon, config, clients, server_started=config.address.socket is None)
            log.info("serving %s as %s%s", config.volume, config.address.uri,
                     f" to {'; '.join(clients)}" if clients else "")
            if ready is not None:
                ready()
            code = daemon.wait()
        except _Stopped:
            with contextlib.suppress(OperationError):
                unexport(daemon)
            raise
        finally:
            _remove_socket(config.address.socket)
    why = daemon.last_error()
    raise OperationError(f"qemu-storage-daemon stopped serving {config.volume} "
                         f"(exit status {code}){': ' + why if why else ''}")


def _remove_socket(path: str | None) -> None:
    """The unix socket the NBD server listened on (the daemon leaves it behind)."""
    if path is not None:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
