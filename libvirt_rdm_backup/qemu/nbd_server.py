"""NBD servers on private unix sockets: ``qemu-nbd`` processes, and socket directories.

A socket lives in a fresh 0700 directory (root only). :func:`qemu_nbd_server`
serves an image with ``qemu-nbd``; QEMU's own NBD server gets its listening
socket from us (see :func:`libvirt_rdm_backup.qemu.fleece.start_nbd_server`)
in a directory from :func:`private_socket_dir`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import CommandError, OperationError
from libvirt_rdm_backup.process import die_with_parent, require_tool
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.names import object_name

SOCKET_ROOT = "/run/libvirt-rdm-backup"
SERVER_TIMEOUT = 30.0


def private_socket_dir(root: str = SOCKET_ROOT) -> str:
    """A fresh 0700 directory under ``root`` (created 0700 too) for an NBD socket."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix="rdmb-nbd-", dir=root)
    except OSError as err:
        raise OperationError(
            f"cannot create a socket directory in {root}: {err.strerror}"
        ) from err


@contextmanager
def qemu_nbd_server(
    path: str, fmt: str | None, *, readonly: bool, extra: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
) -> Iterator[str]:
    """Serve an image with ``qemu-nbd`` on a private unix socket; yields its NBD URI.

    Writable exports turn zero writes into zero clusters (``--detect-zeroes=unmap``).
    The server is always stopped by its pid (SIGTERM, then SIGKILL). ``fmt`` None
    leaves the format to ``extra`` (e.g. ``--image-opts`` with ``driver=`` in ``path``);
    ``pass_fds`` are inherited by the server (e.g. a pipe a ``secret`` object reads).
    """
    exe = require_tool("qemu-nbd")
    sock_dir = tempfile.mkdtemp(prefix="rdmb-qemu-nbd-")
    sock = os.path.join(sock_dir, "nbd.sock")
    name = object_name("nbd", "image")
    argv = [exe, "--persistent", *(["-f", fmt] if fmt else []), "-k", sock, "-x", name]
    argv += ["--read-only"] if readonly else ["--discard=unmap", "--detect-zeroes=unmap"]
    argv += [*img.object_args(), *extra, path]  # the key's secret, where one is in use
    try:
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    preexec_fn=die_with_parent, pass_fds=tuple(pass_fds),
                )
            except OSError as err:
                raise OperationError(f"cannot run qemu-nbd: {err.strerror}") from err
            try:
                _wait_for_socket(proc, sock, argv, stderr)
                yield f"nbd+unix:///{name}?socket={sock}"
            finally:
                _stop_process(proc)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _wait_for_socket(
    proc: subprocess.Popen[bytes], sock: str, argv: list[str], stderr: IO[bytes]
) -> None:
    def accepting() -> bool:
        code = proc.poll()
        if code is not None:
            stderr.seek(0)
            raise CommandError(argv, code, stderr.read().decode(errors="replace"))
        if not os.path.exists(sock):
            return False
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    retry.socket_wait(argv, sock, SERVER_TIMEOUT)(accepting)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
