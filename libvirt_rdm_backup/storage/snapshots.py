"""Storage-side snapshots: point-in-time copies of disks that QEMU cannot copy itself.

``device='lun'`` disks bypass QEMU's block layer (no dirty bitmaps, and a QEMU
backup job on them makes guest I/O fail), so their point in time comes from the
storage. A :class:`SnapshotAgent` takes a crash-consistent snapshot in
milliseconds (:meth:`~SnapshotAgent.snapshot`, inside the guest's freeze or
pause window), makes it readable afterwards (:meth:`~SnapshotAgent.present`),
tells which ranges changed between two snapshots of one disk
(:meth:`~SnapshotAgent.changed_ranges`) and deletes it.

A :class:`StorageSnapshot` is plain data (stored in manifests); its ``handle``
is private to the agent that made it. The registry of agents
(:mod:`.snapshot_agents`) finds that agent again, or picks one for a disk.

The reflink agents keep their clones beside the file they clone (:mod:`.clones`).

A handle read back from a manifest is data the tool does not fully control: an
agent acts on a snapshot only when :meth:`SnapshotAgent.owns` proves it is the
one the agent would have made of *this* disk under that name, and
:func:`~.snapshot_agents.manifest_snapshot` also checks that the name is one of this
chain's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import reflink
from libvirt_rdm_backup.storage.clones import clone_path, open_snapshot_dir

log = logging.getLogger(__name__)

NAME_PREFIX = "rdmb-"
_NAME_RE = re.compile(r"^rdmb-[a-z0-9][a-z0-9.-]{0,58}$")
_UNSAFE_RE = re.compile(r"[^a-z0-9]+")
_TOKEN_RE = re.compile(r"[0-9a-f]{6}")  # the random part of the backup id


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
        """JSON-ready form: every field (the handle copied)."""
        return asdict(self)

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
    :attr:`StorageSnapshot.size` bytes long. An RBD snapshot is read through QEMU's rbd
    driver instead: ``rbd`` is the image with its ``snapshot`` set (``source`` then only
    names it, ``rbd:pool/image@snapshot``). ``written_ranges``: the changed ranges the agent
    reports hold only what was written since the older snapshot, or zeros in both snapshots
    (never unchanged data: they may be copied without comparing digests).
    """

    source: str
    offset: int = 0
    rbd: RbdSource | None = None
    written_ranges: bool = False


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

    def owns(self, disk: RawDisk, snap: StorageSnapshot) -> str | None:
        """None when ``snap`` is what this agent makes of ``disk`` under its name, else why not.

        Every other method that takes a snapshot refuses one it does not own.
        """
        ...

    def present(self, disk: RawDisk, snap: StorageSnapshot) -> Presented:
        """Make the snapshot readable (idempotent); may take longer, after the window."""
        ...

    def withdraw(self, disk: RawDisk, snap: StorageSnapshot) -> None:
        """Stop presenting the snapshot (idempotent)."""
        ...

    def changed_ranges(
        self, disk: RawDisk, older: StorageSnapshot, newer: StorageSnapshot
    ) -> list[tuple[int, int]] | None:
        """``(offset, length)`` disk ranges that may differ, sorted and merged; None: unknown."""
        ...

    def exists(self, disk: RawDisk, snap: StorageSnapshot) -> bool:
        """True while the snapshot's data exists."""
        ...

    def prune(self, disk: RawDisk, prefix: str, keep: set[str]) -> list[str]:
        """Delete this disk's snapshots named ``prefix`` + token that are not in ``keep``.

        Removes what killed runs left (snapshots no manifest refers to); returns
        the names deleted.
        """
        ...

    def delete(self, disk: RawDisk, snap: StorageSnapshot) -> None:
        """Withdraw and delete the snapshot (idempotent)."""
        ...


def _tag(text: str) -> str:
    return _UNSAFE_RE.sub("-", text.lower()).strip("-")[:16] or "x"


def scoped_prefix(repo_id: str, chain: str, disk: str) -> str:
    """Prefix of the snapshots one chain of one repository takes of one disk.

    ``rdmb-<repo>-<chain>-<disk>.<hash>-``: the readable tags are lowercased and
    cut to 16 characters, so the hash of the exact repository id, chain and disk
    keeps ``daily``, ``Daily`` and long names apart; the ``.`` (which older
    names never hold) tells these names from the older ones
    (:func:`legacy_prefix`). A name of the scope is the prefix and 6 hex digits.
    """
    digest = hashlib.sha256(f"{repo_id}\0{chain}\0{disk}".encode()).hexdigest()[:8]
    return f"{NAME_PREFIX}{_tag(repo_id)}-{_tag(chain)}-{_tag(disk)}.{digest}-"


def legacy_prefix(repo_id: str, chain: str, disk: str) -> str:
    """The prefix older versions gave a scope's snapshots (shared by colliding chains)."""
    return f"{NAME_PREFIX}{_tag(repo_id)}-{_tag(chain)}-{_tag(disk)}-"


def _unscoped_prefix(_repo_id: str, _chain: str, disk: str) -> str:
    """The prefix the first versions gave every snapshot of a disk, whatever the chain."""
    return f"{NAME_PREFIX}snap-{disk}-"


def in_scope(name: str, prefix: str) -> bool:
    """True when ``name`` is exactly ``prefix`` and a 6 hex digit token."""
    return name.startswith(prefix) and bool(_TOKEN_RE.fullmatch(name[len(prefix):]))


def scope_problem(name: str, repo_id: str, chain: str, disk: str) -> str | None:
    """None when ``name`` is a snapshot name of this scope (older names too), else why not.

    Older names are recognised here, for snapshots a manifest of the chain
    names; :func:`stale_clones` deletes by the unambiguous prefix only.
    """
    prefixes = (scoped_prefix, legacy_prefix, _unscoped_prefix)
    if any(in_scope(name, p(repo_id, chain, disk)) for p in prefixes):
        return None
    return (f"snapshot name {name!r} is not one of chain {chain!r}'s names for "
            f"{disk} ({scoped_prefix(repo_id, chain, disk)}XXXXXX)")


def stale_clones(backing: str, prefix: str, keep: set[str]) -> list[str]:
    """Names of the clones beside ``backing`` in the scope ``prefix`` that are not kept.

    Only regular files count: a symlink or anything else in the directory is
    never followed nor reported (and so never deleted).
    """
    directory = os.path.dirname(clone_path(backing, "x"))
    try:
        fd = open_snapshot_dir(directory)
    except FileNotFoundError:
        return []
    try:
        names = []
        for entry in os.listdir(fd):
            name = entry[: -len(".img")]
            if not entry.endswith(".img") or not in_scope(name, prefix) or name in keep:
                continue
            if stat.S_ISREG(os.lstat(entry, dir_fd=fd).st_mode):
                names.append(name)
            else:
                log.warning("leaving %s alone: not a regular file", os.path.join(directory, entry))
        return sorted(names)
    except OSError as err:
        raise StorageError(f"cannot list {directory}: {err.strerror}") from err
    finally:
        os.close(fd)


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


def sync_file(path: str, follow_links: bool = False) -> None:
    """``fdatasync`` a file or block device: its dirty pages written back and flushed
    (raises StorageError). A link is followed only when ``follow_links``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW))
    except OSError as err:
        raise StorageError(f"cannot open {path}: {err.strerror}") from err
    try:
        os.fdatasync(fd)
    except OSError as err:
        raise StorageError(f"cannot flush {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def handle_problem(agent: str, disk: RawDisk, snap: StorageSnapshot,
                   expected: dict[str, Any]) -> str | None:
    """Why ``snap`` is not what agent ``agent`` makes of ``disk`` (None: it is).

    ``expected`` holds the handle entries the agent derives for this disk and
    the snapshot's name; each must be there, equal and of the same type.
    """
    if snap.agent != agent:
        return f"it was made by agent {snap.agent!r}, not {agent}"
    if snap.disk != disk.target:
        return f"it is a snapshot of {snap.disk!r}, not of {disk.target}"
    if not _NAME_RE.match(snap.name):
        return f"{snap.name!r} is not a snapshot name"
    for key, want in expected.items():
        got = snap.handle.get(key)
        if got != want or type(got) is not type(want):
            return f"its {key} {got!r} is not {want!r}"
    return None


def refuse_foreign(agent: SnapshotAgent, disk: RawDisk, snap: StorageSnapshot) -> None:
    """Raise StorageError unless ``agent`` owns ``snap`` of ``disk``."""
    problem = agent.owns(disk, snap)
    if problem:
        raise StorageError(f"snapshot {snap.name!r} of {disk.target} is not one "
                           f"{agent.name} made of it, left untouched: {problem}")


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


def clones_changed(agent: SnapshotAgent, disk: RawDisk, older: StorageSnapshot,
                   newer: StorageSnapshot, offset: int) -> list[tuple[int, int]] | None:
    """Disk ranges whose blocks differ between the clone files of two of ``agent``'s
    snapshots (the disk at ``offset`` of each); None when they are not comparable (not the
    agent's own, gone, or of different sizes)."""
    if agent.owns(disk, older) or agent.owns(disk, newer) or older.size != newer.size:
        return None
    if not (agent.exists(disk, older) and agent.exists(disk, newer)):
        return None
    return reflink.changed_between(handle_str(older, "clone"), handle_str(newer, "clone"),
                                   offset, newer.size)

