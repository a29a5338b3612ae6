"""Backup targets named by URI: a repository directory, or an NBD export.

``DIR`` or ``file:///DIR``            a file repository
``nbd://HOST[:PORT]/EXPORT``          an NBD export over TCP (plain)
``nbds://HOST[:PORT]/EXPORT``         the same over TLS (``--tls-creds``)
``nbd+unix:///EXPORT?socket=PATH``    an NBD export on a unix socket
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


def parse_target(text: str, allow_remote_plain: bool = False) -> str | NbdAddress:
    """A repository path or an :class:`NbdAddress` (raises UsageError when malformed).

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


def _clean(path: str) -> bool:
    """False for paths with NUL or line breaks (percent-decoded ones included)."""
    return not any(c in path for c in "\x00\r\n")
