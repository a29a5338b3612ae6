"""Backup targets named by URI: a repository directory, an NBD export, or a Ceph pool.

``DIR`` or ``file:///DIR``            a file repository
``nbd://HOST[:PORT]/EXPORT``          an NBD export over TCP (plain)
``nbds://HOST[:PORT]/EXPORT``         the same over TLS (``--tls-creds``)
``nbd+unix:///EXPORT?socket=PATH``    an NBD export on a unix socket
``rbd://POOL[/PREFIX]?conf=PATH&id=USER``  RBD images and rados objects in a Ceph pool
                                      (``ceph://`` alike; ``object-size=64K|4M|…``)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.redact import redact

DEFAULT_NBD_PORT = 10809
_EXPORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CEPH_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_RBD_OBJECT_SIZE = 64 * 1024
PATH_MAX = 4095  # bytes of a path the kernel takes (4096 with the NUL)
_SIZE_RE = re.compile(r"^([0-9]{1,5})([KkMm])$")


@dataclass(frozen=True)
class RbdAddress:
    """Where backups kept on Ceph live: a pool, a name prefix, the client's config and user."""

    pool: str
    conf: str
    user: str
    prefix: str = ""
    object_size: int = DEFAULT_RBD_OBJECT_SIZE

    @property
    def uri(self) -> str:
        """The target as written (no key: the key comes from the keyring file)."""
        where = f"{self.pool}/{self.prefix}" if self.prefix else self.pool
        return f"rbd://{where}?conf={self.conf}&id={self.user}"


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD export lives."""

    export: str
    host: str | None = None
    port: int = DEFAULT_NBD_PORT
    socket: str | None = None
    tls: bool = False

    @property
    def uri(self) -> str:
        """The libnbd / qemu-img URI."""
        if self.socket is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}/{self.export}"

    def qemu_server(self) -> dict[str, Any]:
        """QMP ``SocketAddress`` of the server."""
        if self.socket is not None:
            return {"type": "unix", "path": self.socket}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and loopback addresses."""
        if self.socket is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(str(self.host)).is_loopback
        except ValueError:
            return False


def parse_target(text: str, allow_remote_plain: bool = False
                 ) -> str | NbdAddress | RbdAddress:
    """A repository path, an :class:`NbdAddress` or an :class:`RbdAddress` (raises
    UsageError when malformed).

    Plain NBD to a non-loopback address is refused unless ``allow_remote_plain``:
    the data would cross the network unencrypted.
    """
    shown = redact(text)
    if not text or "\x00" in text or "\n" in text:
        raise UsageError(f"malformed target {shown!r}")
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError as err:  # "Invalid IPv6 URL", netloc characters under NFKC
        raise UsageError(f"malformed target {shown!r}: {err}") from err
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path or not _clean(path):
            raise UsageError(f"malformed file target {shown!r}")
        return path
    if parts.scheme in ("rbd", "ceph"):
        # the query is not repeated in errors: a mistyped one might hold a key
        return _rbd_address(parts.netloc, unquote(parts.path), parts.query,
                            redact(text.split("?", 1)[0]))
    if parts.scheme not in ("nbd", "nbds", "nbd+unix"):
        raise UsageError(f"unsupported target scheme {parts.scheme!r} in {shown!r}")
    export = unquote(parts.path.lstrip("/"))
    if not _EXPORT_RE.fullmatch(export) or ".." in export:
        raise UsageError(f"malformed NBD export name {export!r} in {shown!r}")
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket", [])
        if (parts.netloc or len(sockets) != 1 or not sockets[0].startswith("/")
                or not _clean(sockets[0])):
            raise UsageError(f"nbd+unix target needs ?socket=/absolute/path: {shown!r}")
        return NbdAddress(export=export, socket=sockets[0])
    try:
        host, port = parts.hostname, parts.port
    except ValueError as err:
        raise UsageError(f"malformed NBD address in {shown!r}: {err}") from err
    if not host or parts.username or parts.password or parts.query or port == 0:
        raise UsageError(f"malformed NBD address in {shown!r}")
    address = NbdAddress(export=export, host=host, port=port or DEFAULT_NBD_PORT,
                         tls=parts.scheme == "nbds")
    if not address.tls and not address.is_loopback and not allow_remote_plain:
        raise UsageError(
            f"plain NBD to {host} would send disk data unencrypted; use nbds:// with "
            "--tls-creds, or --allow-plain-nbd")
    return address


def _rbd_address(pool: str, path: str, query: str, shown: str) -> RbdAddress:
    """The :class:`RbdAddress` of ``rbd://POOL[/PREFIX]?conf=PATH&id=USER``."""
    prefix = path.strip("/")
    try:
        fields = parse_qs(query, strict_parsing=True, keep_blank_values=True)
    except ValueError as err:
        raise UsageError(f"malformed rbd target {shown!r}: {err}") from err
    unknown = sorted(set(fields) - {"conf", "id", "object-size"})
    if unknown or any(len(v) != 1 for v in fields.values()):
        raise UsageError(f"rbd target {shown!r}: give conf, id and object-size once each "
                         f"(not {', '.join(unknown) or 'repeated'})")
    conf, user = fields.get("conf", [""])[0], fields.get("id", [""])[0]
    if not _CEPH_NAME_RE.fullmatch(pool) or (prefix and not _CEPH_NAME_RE.fullmatch(prefix)):
        raise UsageError(f"rbd target {shown!r}: pool and prefix are names of letters, digits "
                         "and . _ - (one level of prefix)")
    if not conf.startswith("/") or not _clean(conf) or len(conf) > PATH_MAX \
            or not _CEPH_NAME_RE.fullmatch(user):
        raise UsageError(f"rbd target {shown!r} needs ?conf=/absolute/ceph.conf&id=USER")
    size = DEFAULT_RBD_OBJECT_SIZE
    if "object-size" in fields:
        match = _SIZE_RE.fullmatch(fields["object-size"][0])
        size = int(match.group(1)) * (1024 if match.group(2) in "Kk" else 1 << 20) if match else 0
        if size < 4096 or size > 32 << 20 or size & (size - 1):
            raise UsageError(f"rbd target {shown!r}: object-size is a power of two from 4K "
                             "to 32M (e.g. 64K, 4M)")
    return RbdAddress(pool=pool, conf=conf, user=user, prefix=prefix, object_size=size)


def _clean(path: str) -> bool:
    """False for paths with NUL or line breaks (percent-decoded ones included)."""
    return not any(c in path for c in "\x00\r\n")
