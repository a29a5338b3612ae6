"""The key of encrypted layers, and how it reaches QEMU without being shown anywhere.

A key is the exact bytes of a key file (``--encrypt-key-file``), UTF-8 text (QEMU's
LUKS takes a passphrase). QEMU gets it as a
``secret`` object whose ``file`` is a path, never the key itself:

* QEMU processes this tool starts (``qemu-img``, ``qemu-nbd``, the private storage
  daemon) read it from an anonymous memory file this process holds open
  (:func:`key_file`), by the path ``/proc/PID/fd/N`` that only processes allowed to
  trace this one (root's) may open; it is named by no directory, and the kernel frees
  it when the block ends or the tool dies, even by SIGKILL;
* the guest's QEMU (another user, reached through libvirt) gets an anonymous memory
  file holding the key through ``add-fd``, and reads it as ``/proc/self/fd/N``
  (:func:`guest_secret`); the descriptor is removed once the object holds the key.

So no argv, QMP message, log line, manifest or error message carries the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.qemu.monitor import Monitor

SECRET_ID = "rdmb-layer-key"  # the secret object of every QEMU that opens encrypted layers
MAX_KEY = 4096  # bytes of a key file (a passphrase or random bytes)


class LayerKey:
    """The key of encrypted layers; its bytes are never printed (see :meth:`__repr__`)."""

    def __init__(self, data: bytes) -> None:
        if not data:
            raise UsageError("the encryption key file is empty")
        try:  # QEMU's LUKS takes a passphrase: UTF-8 text without NUL
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:
            raise UsageError("the encryption key file must be UTF-8 text without NUL bytes "
                             "(e.g. head -c 32 /dev/urandom | base64 > FILE)")
        self._data = data

    def __repr__(self) -> str:
        return "LayerKey(<hidden>)"

    @classmethod
    def from_file(cls, path: str) -> LayerKey:
        """The key held by the file ``path`` (its exact bytes; raises UsageError)."""
        try:
            with open(path, "rb") as stream:
                data = stream.read(MAX_KEY + 1)
        except OSError as err:
            raise UsageError(f"cannot read the encryption key file {path}: "
                             f"{err.strerror or err}") from None
        if len(data) > MAX_KEY:
            raise UsageError(f"the encryption key file {path} has more than {MAX_KEY} bytes")
        return cls(data)

    def key_id(self, salt: bytes) -> str:
        """A salted digest that names the key without telling it (HMAC-SHA256, hex)."""
        return hmac.new(salt, self._data, hashlib.sha256).hexdigest()

    @staticmethod
    def pair_key(old: LayerKey, new: LayerKey, label: bytes) -> bytes:
        """A key only who holds both keys can derive (HMAC-SHA256 keyed by the
        domain-separation ``label`` over both keys' bytes, each length-prefixed), e.g. to
        authenticate what a change from ``old`` to ``new`` writes; never to be stored."""
        message = b"".join(len(k._data).to_bytes(4, "big") + k._data for k in (old, new))
        return hmac.new(label, message, hashlib.sha256).digest()

    def write_to(self, fd: int) -> None:
        """Write the key to the open descriptor ``fd`` (a private file)."""
        view = memoryview(self._data)
        while view:
            view = view[os.write(fd, view):]


def secret_object(path: str, secret_id: str = SECRET_ID) -> dict[str, Any]:
    """``object-add`` arguments of the secret read from ``path``."""
    return {"qom-type": "secret", "id": secret_id, "format": "raw", "file": path}


def secret_definition(path: str, secret_id: str = SECRET_ID) -> str:
    """The same secret as a ``--object`` definition of qemu-img and qemu-nbd."""
    return f"secret,id={secret_id},format=raw,file={path.replace(',', ',,')}"


_ACTIVE: ContextVar[str | None] = ContextVar("layer_key_file", default=None)


def active_secret() -> dict[str, Any] | None:
    """``object-add`` arguments of the key of the running command (:func:`key_file`), for
    QEMUs that open whatever encrypted layers they are given; None without a key."""
    path = _ACTIVE.get()
    return None if path is None else secret_object(path)


@contextmanager
def key_file(key: LayerKey) -> Iterator[str]:
    """The key in an anonymous memory file of this process (``memfd``), for the block, as
    the path QEMU processes this tool starts read it by (``/proc/PID/fd/N``); the key of
    :func:`active_secret` meanwhile. Nothing is written to any file system: closed at the
    end of the block, or with the process, however it ends, the file is gone."""
    fd = os.memfd_create("rdmb-key", os.MFD_CLOEXEC)
    try:
        key.write_to(fd)
        os.fchmod(fd, 0o400)
        path = f"/proc/{os.getpid()}/fd/{fd}"
        token = _ACTIVE.set(path)
        try:
            yield path
        finally:
            _ACTIVE.reset(token)
    finally:
        os.close(fd)


@contextmanager
def guest_secret(monitor: Monitor, key: LayerKey, secret_id: str = SECRET_ID
                 ) -> Iterator[str]:
    """The secret object ``secret_id`` in the guest's QEMU for the block (deleted after).

    The key goes over as an anonymous memory file (``add-fd``); QEMU reads it by its
    descriptor number, which ``add-fd`` returns; the descriptor is removed right after.
    """
    fd = os.memfd_create("rdmb-key", os.MFD_CLOEXEC)
    try:
        key.write_to(fd)
        os.fchmod(fd, 0o444)  # reachable only through the descriptor tables of two processes
        added = monitor.execute("add-fd", {"opaque": secret_id}, files=[fd])
    finally:
        os.close(fd)
    try:
        monitor.execute("object-add", secret_object(f"/proc/self/fd/{int(added['fd'])}",
                                                    secret_id))
    finally:
        with suppress(RdmBackupError):
            monitor.execute("remove-fd", {"fdset-id": int(added["fdset-id"])})
    try:
        yield secret_id
    finally:
        with suppress(RdmBackupError):
            monitor.execute("object-del", {"id": secret_id})
