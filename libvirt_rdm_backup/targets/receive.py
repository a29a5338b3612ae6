"""The backup-server side of NBD targets: serve a backup volume with ``qemu-nbd``.

``rdm-backup receive`` keeps one sparse volume file and serves it as one NBD
export; backups pushed into it (``backup --target nbd://...``) are complete
repositories that ``list``, ``verify`` and ``restore`` read from the same address.
One writer at a time: backups take the writer lease kept in the volume itself
(:mod:`nbd_volume`), and one ``receive`` at a time serves a volume file.
No listener on a non-loopback address without TLS unless explicitly allowed.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from libvirt_rdm_backup.errors import OperationError, UsageError
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.process import die_with_parent, require_tool
from libvirt_rdm_backup.qemu.layers import option_value
from libvirt_rdm_backup.targets.uri import DEFAULT_NBD_PORT, NbdAddress, parse_target

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 40  # a sparse TiB: only what backups write takes space


@dataclass(frozen=True)
class ReceiveConfig:
    """What ``receive`` serves, and where."""

    volume: str
    address: NbdAddress
    size: int = DEFAULT_SIZE
    tls_dir: str | None = None
    allow_plain_remote: bool = False


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


def qemu_nbd_argv(config: ReceiveConfig) -> list[str]:
    """The ``qemu-nbd`` command line serving the volume (argv list, no shell)."""
    address = config.address
    if not address.is_loopback and config.tls_dir is None and not config.allow_plain_remote:
        raise UsageError(f"serving NBD on {address.host} without TLS would expose backups "
                         "unencrypted; give --tls-creds DIR, or --allow-plain-remote")
    argv = [require_tool("qemu-nbd"), "--format=raw", "--persistent", "--shared=0",
            "--export-name", address.export, "--cache=writeback", "--discard=unmap",
            "--detect-zeroes=unmap"]
    if address.socket is not None:
        argv += ["--socket", address.socket]
    else:
        argv += ["--bind", str(address.host), "--port", str(address.port)]
    if config.tls_dir is not None:
        argv += ["--object",
                 f"tls-creds-x509,id=rdmb-tls,endpoint=server,dir={option_value(config.tls_dir)}",
                 "--tls-creds", "rdmb-tls"]
    return [*argv, config.volume]


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
    """Serve until SIGINT/SIGTERM; returns qemu-nbd's exit status (0 after a signal).

    The volume file is locked (``flock``) while served: a second ``receive`` of
    it fails (OperationError) instead of serving it beside the first. ``ready``
    is called once the volume is locked, before serving starts.
    """
    ensure_volume(config.volume, config.size)
    try:
        with exclusive(config.volume, f"volume {config.volume} is already being served"):
            if ready is not None:
                ready()
            return _serve(config)
    except OSError as err:
        raise OperationError(f"cannot lock volume {config.volume}: {err.strerror}") from err


def _serve(config: ReceiveConfig) -> int:
    argv = qemu_nbd_argv(config)
    log.info("serving %s as %s", config.volume, config.address.uri)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        proc.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return 0 if stopping else code
