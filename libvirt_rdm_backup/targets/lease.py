"""The writer lease of an NBD volume: who may write it, held in its superblock.

NBD has no locks and no atomic compare-and-swap, and one volume can be reached
by many names (``localhost``, ``127.0.0.1``, a host name) from many hosts, so
the exclusion lives in the volume itself (see :mod:`nbd_volume`). A lease names
its holder (a random token, the host, the process) and when the holder last
renewed it, and how far the regions it may write into reach; the holder renews
it every third of its ``ttl`` while it writes, and with every region it takes.

A lease whose holder is gone can be taken over: at once when the holder ran on
this host and its process no longer exists, otherwise once it has not been
renewed for ``ttl`` seconds by the taker's clock *and* the taker has watched it
stay unrenewed for a renewal interval and more on its own monotonic clock.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from libvirt_rdm_backup.process import env_seconds
from libvirt_rdm_backup.repository.ids import now_iso

LEASE_ENV = "RDM_BACKUP_VOLUME_LEASE"
DEFAULT_TTL = 60.0
MAX_TTL = 3600.0  # a takeover watches a lease for half its ttl: bounded by this
_TOKEN_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_TAKEN = 4096  # free regions one lease holds at most (past that, a writer grows the volume)
HELD: set[str] = set()  # tokens of the leases this process holds now


def lease_ttl() -> float:
    """Seconds a lease lasts without renewal (``RDM_BACKUP_VOLUME_LEASE``, default 60)."""
    return min(env_seconds(LEASE_ENV, DEFAULT_TTL), MAX_TTL)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as stream:
            return stream.read(4096).strip()
    except OSError:
        return ""


def _node() -> str:
    """This boot of this machine, in this pid namespace (pids compare only within it)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{_read('/proc/sys/kernel/random/boot_id')}/{namespace}"


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks since boot ('' when it does not exist)."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class Lease:
    """A writer's claim on a volume."""

    token: str
    host: str
    node: str
    pid: int
    started: str
    renewed: str
    ttl: float
    reserved: int = 0  # the end of the regions the holder may write into
    taken: tuple[tuple[int, int], ...] = ()  # free regions the holder may write into

    @classmethod
    def mine(cls, ttl: float | None = None, reserved: int = 0,
             taken: tuple[tuple[int, int], ...] = ()) -> Lease:
        """A new lease for this process, renewed now."""
        pid = os.getpid()
        return cls(secrets.token_hex(16), socket.gethostname()[:255], _node(), pid,
                   _start_time(pid), now_iso(), lease_ttl() if ttl is None else ttl, reserved,
                   taken)

    def renew(self, reserved: int | None = None,
              taken: tuple[tuple[int, int], ...] | None = None) -> Lease:
        """The same lease, renewed now (and reaching to ``reserved``, holding ``taken``,
        when given)."""
        return replace(self, renewed=now_iso(),
                       reserved=self.reserved if reserved is None else reserved,
                       taken=self.taken if taken is None else taken)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> Lease:
        """Parse a stored lease (ValueError when malformed)."""
        if not isinstance(doc, dict):
            raise ValueError("lease is not an object")
        token, host, node, started, renewed = (doc.get(k) for k in (
            "token", "host", "node", "started", "renewed"))
        pid, ttl, reserved = doc.get("pid"), doc.get("ttl"), doc.get("reserved", 0)
        if not (isinstance(token, str) and _TOKEN_RE.fullmatch(token)):
            raise ValueError("malformed lease token")
        for value in (host, node, started, renewed):  # shown in messages: printable only
            if not isinstance(value, str) or len(value) > 255 or not value.isprintable():
                raise ValueError("malformed lease holder")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
            raise ValueError("malformed lease pid")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL:
            raise ValueError("malformed lease ttl")
        if not isinstance(reserved, int) or isinstance(reserved, bool) or not (
                0 <= reserved < 1 << 62):
            raise ValueError("malformed lease reservation")
        _parse_time(str(renewed))
        return cls(str(token), str(host), str(node), pid, str(started), str(renewed),
                   float(ttl), reserved, _taken(doc.get("taken", [])))

    def describe(self) -> str:
        """The holder, for messages."""
        return f"host {self.host} pid {self.pid}, lease renewed {self.renewed}"

    def holder_gone(self) -> bool:
        """True when the holder ran on this host (same boot, same pid namespace) and is gone.

        This process counts as gone for a lease of its own that it no longer holds
        (one it could not release when the server went away).
        """
        if self.node != _node():
            return False
        if self.pid == os.getpid() and self.started == _start_time(self.pid):
            return self.token not in HELD
        return _start_time(self.pid) != self.started

    def expired(self) -> bool:
        """True when not renewed for ``ttl`` seconds by this host's clock."""
        age = datetime.now(UTC) - _parse_time(self.renewed)
        return age.total_seconds() > self.ttl


def _taken(value: Any) -> tuple[tuple[int, int], ...]:
    """A stored list of taken regions, ``[[offset, length], ...]`` (ValueError when malformed)."""
    def region(item: Any) -> bool:
        return (isinstance(item, list) and len(item) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 62
                        for n in item))

    if not isinstance(value, list) or len(value) > MAX_TAKEN or not all(map(region, value)):
        raise ValueError("malformed lease regions")
    return tuple((int(o), int(n)) for o, n in value)


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("lease time without a zone")
    return value
