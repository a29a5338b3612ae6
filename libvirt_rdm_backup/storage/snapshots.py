"""Storage-side snapshots: point-in-time copies of disks that QEMU cannot copy itself.

``device='lun'`` disks bypass QEMU's block layer (no dirty bitmaps, and a QEMU
backup job on them makes guest I/O fail), so their point in time comes from the
storage. A :class:`SnapshotAgent` takes a crash-consistent snapshot in
milliseconds (:meth:`~SnapshotAgent.snapshot`, inside the guest's freeze or
pause window), makes it readable afterwards (:meth:`~SnapshotAgent.present`),
tells which ranges changed between two snapshots of one disk
(:meth:`~SnapshotAgent.changed_ranges`) and deletes it.

A :class:`StorageSnapshot` is plain data (stored in manifests); its ``handle``
is private to the agent that made it. :func:`agent_by_name` finds that agent
again; :func:`find_snapshot_agent` picks one for a disk.

The reflink agents keep their clones in :data:`SNAPSHOT_DIR` beside the file
they clone (:func:`clone_path`, :func:`remove_clone`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import reflink

log = logging.getLogger(__name__)

NAME_PREFIX = "rdmb-"
SNAPSHOT_DIR = ".rdmb-snapshots"
_NAME_RE = re.compile(r"^rdmb-[a-z0-9][a-z0-9.-]{0,58}$")
_UNSAFE_RE = re.compile(r"[^a-z0-9]+")


@dataclass
class StorageSnapshot:
    """A snapshot of one disk, as stored in a manifest.

    ``size`` is the disk's size in bytes at the snapshot; ``handle`` is the
    agent's own data to find, present, compare and delete it later.
    """

    agent: str
    disk: str
    name: str
    created: str
    size: int
    handle: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "agent": self.agent,
            "disk": self.disk,
            "name": self.name,
            "created": self.created,
            "size": self.size,
            "handle": dict(self.handle),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StorageSnapshot:
        """Inverse of :meth:`to_dict` (raises KeyError/TypeError/ValueError when malformed)."""
        return cls(
            agent=str(data["agent"]),
            disk=str(data["disk"]),
            name=str(data["name"]),
            created=str(data["created"]),
            size=int(data["size"]),
            handle=dict(data.get("handle") or {}),
        )


@dataclass(frozen=True)
class Presented:
    """Where to read a presented snapshot: raw bytes of the disk from ``offset`` of ``source``.

    ``source`` is a path or an ``iscsi://`` URL; the disk is
    :attr:`StorageSnapshot.size` bytes long.
    """

    source: str
    offset: int = 0


@runtime_checkable
class SnapshotAgent(Protocol):
    """Takes, presents, compares and deletes storage snapshots of one kind of disk."""

    name: str

    def can_snapshot(self, disk: RawDisk) -> bool:
        """True when this agent can snapshot ``disk`` (never raises)."""
        ...

    def flush(self, disk: RawDisk) -> None:
        """Write back what the storage holds dirty for ``disk``, before the window opens, so
        that the snapshot inside it does not wait for writeback."""
        ...

    def snapshot(self, disk: RawDisk, name: str) -> StorageSnapshot:
        """Take snapshot ``name`` of ``disk`` now; fast, it runs inside the consistency window."""
        ...

    def present(self, snap: StorageSnapshot) -> Presented:
        """Make the snapshot readable (idempotent); may take longer, after the window."""
        ...

    def withdraw(self, snap: StorageSnapshot) -> None:
        """Stop presenting the snapshot (idempotent)."""
        ...

    def changed_ranges(
        self, older: StorageSnapshot, newer: StorageSnapshot
    ) -> list[tuple[int, int]] | None:
        """``(offset, length)`` disk ranges that may differ, sorted and merged; None: unknown."""
        ...

    def exists(self, snap: StorageSnapshot) -> bool:
        """True while the snapshot's data exists."""
        ...

    def prune(self, disk: RawDisk, prefix: str, keep: set[str]) -> list[str]:
        """Delete this disk's snapshots named ``prefix...`` that are not in ``keep``.

        Removes what killed runs left (snapshots no manifest refers to); returns
        the names deleted.
        """
        ...

    def delete(self, snap: StorageSnapshot) -> None:
        """Withdraw and delete the snapshot (idempotent)."""
        ...


def snapshot_agents() -> list[SnapshotAgent]:
    """Every snapshot agent, in the order :func:`find_snapshot_agent` tries them."""
    from libvirt_rdm_backup.storage.loop_snapshots import LoopReflinkAgent
    from libvirt_rdm_backup.storage.tgt_snapshots import TgtReflinkAgent

    return [TgtReflinkAgent(), LoopReflinkAgent()]


def find_snapshot_agent(disk: RawDisk) -> SnapshotAgent | None:
    """The first agent that can snapshot ``disk``, or None."""
    return next((agent for agent in snapshot_agents() if agent.can_snapshot(disk)), None)


def agent_by_name(name: str) -> SnapshotAgent:
    """The agent called ``name`` (raises StorageError for an unknown one)."""
    for agent in snapshot_agents():
        if agent.name == name:
            return agent
    raise StorageError(f"unknown snapshot agent {name!r}")


def scoped_prefix(repo_id: str, chain: str, disk: str) -> str:
    """Prefix of the snapshots one chain of one repository takes of one disk."""
    def tag(text: str) -> str:
        return _UNSAFE_RE.sub("-", text.lower()).strip("-")[:16] or "x"

    return f"{NAME_PREFIX}{tag(repo_id)}-{tag(chain)}-{tag(disk)}-"


def stale_clones(backing: str, prefix: str, keep: set[str]) -> list[str]:
    """Names of the clones beside ``backing`` that start with ``prefix`` and are not kept."""
    directory = os.path.dirname(clone_path(backing, "x"))
    try:
        files = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StorageError(f"cannot list {directory}: {err.strerror}") from err
    names = [f[: -len(".img")] for f in files if f.endswith(".img")]
    return sorted(n for n in names if n.startswith(prefix) and n not in keep)


def new_snapshot_name(disk: str) -> str:
    """A fresh valid name: ``rdmb-<disk>-<UTC time>-<random>``."""
    tag = _UNSAFE_RE.sub("-", disk.lower()).strip("-")[:16] or "disk"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{NAME_PREFIX}{tag}-{stamp}-{secrets.token_hex(3)}"


def check_name(name: str) -> str:
    """``name`` when it is a valid snapshot name (``rdmb-`` and ``[a-z0-9.-]``, at most 64)."""
    if not _NAME_RE.match(name):
        raise StorageError(
            f"invalid snapshot name {name!r}: want 'rdmb-' and lowercase letters, digits, "
            "'.' or '-' (at most 64 characters)"
        )
    return name


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds (``2026-11-25T14:44:25.435Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clone_path(source: str, name: str) -> str:
    """Where the reflink clone ``name`` of file ``source`` lives: ``<dir>/.rdmb-snapshots/``."""
    return os.path.join(os.path.dirname(os.path.abspath(source)), SNAPSHOT_DIR, f"{name}.img")


def make_clone(source: str, name: str) -> str:
    """Clone ``source`` as snapshot ``name`` beside it (directory made 0700); its path."""
    path = clone_path(source, name)
    try:
        reflink.reflink_clone(source, path)
    except StorageError:
        if os.path.isdir(os.path.dirname(path)):
            raise
        try:
            os.mkdir(os.path.dirname(path), 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise StorageError(f"cannot create {os.path.dirname(path)}: {err.strerror}") from err
        reflink.reflink_clone(source, path)
    return path


def sync_file(path: str) -> None:
    """``fdatasync`` a file: its dirty pages written back (raises StorageError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        raise StorageError(f"cannot open {path}: {err.strerror}") from err
    try:
        os.fdatasync(fd)
    except OSError as err:
        raise StorageError(f"cannot flush {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def remove_clone(path: str) -> None:
    """Delete a clone (idempotent) and its snapshot directory once that is empty."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"cannot delete snapshot file {path}: {err.strerror}") from err
    try:
        os.rmdir(os.path.dirname(path))
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            log.debug("keeping %s: %s", os.path.dirname(path), err)


def handle_str(snap: StorageSnapshot, key: str) -> str:
    """``snap.handle[key]`` as a string (raises StorageError when missing)."""
    value = snap.handle.get(key)
    if not isinstance(value, str) or not value:
        raise StorageError(f"snapshot {snap.name} of {snap.disk} has no {key} in its handle")
    return value


def handle_int(snap: StorageSnapshot, key: str) -> int:
    """``snap.handle[key]`` as an int (raises StorageError when missing)."""
    value = snap.handle.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise StorageError(f"snapshot {snap.name} of {snap.disk} has no {key} in its handle")
    return value
