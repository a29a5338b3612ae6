"""Snapshots of loop devices over files that can be reflinked.

:class:`LoopReflinkAgent` serves block disks whose source is a loop device
(read through :class:`SysfsAgent`: ``loop/backing_file``, ``loop/offset``,
``loop/sizelimit``) over a regular file on a filesystem that shares extents.

* snapshot: ``fsync`` of the loop device, then a reflink clone of the whole
  backing file, ``<dir>/.rdmb-snapshots/<name>.img``. Buffered writes to
  ``/dev/loopN`` (QEMU without ``cache=none``, ``dd`` without ``oflag=direct``)
  sit in the loop device's own page cache, which FICLONE on the backing file
  does not see; the fsync pushes them through the loop driver into the backing
  file (and makes the loop driver fsync that file). FICLONE then writes back
  whatever of the backing file is still dirty.
* present: the clone itself; the disk's bytes start at the loop offset.
* changed ranges: :func:`reflink.changed_between` over ``[offset, offset+size)``.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, StorageError
from libvirt_rdm_backup.storage import clones, reflink, snapshots
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.sysfs import SysfsAgent


class LoopReflinkAgent:
    """Reflink snapshots of loop devices over files, read from the clone at the loop offset."""

    name = "loop-reflink"

    def __init__(self, sysfs: SysfsAgent | None = None) -> None:
        self.sysfs = sysfs or SysfsAgent()

    def _loop(self, disk: RawDisk) -> tuple[StorageNode, str]:
        """The disk's loop node (from sysfs) and its backing file."""
        if disk.source_kind is SourceKind.ISCSI or not disk.source_path:
            raise StorageError(f"disk {disk.target} is not a host block device")
        node = self.sysfs.map_path(disk.source_path)
        if node.kind != "loop":
            raise StorageError(f"{disk.source_path} is not a loop device")
        backing = node.identity.get("backing_file")
        if not backing or node.identity.get("backing_file_deleted"):
            raise StorageError(f"loop device {node.path} has no backing file")
        if not node.extents or node.extents[0].target.kind != "file":
            raise StorageError(f"loop device {node.path} is backed by {backing}, not a file")
        return node, str(backing)

    def can_snapshot(self, disk: RawDisk) -> bool:
        """True for loop devices over a regular file on a reflink filesystem."""
        try:
            _node, backing = self._loop(disk)
            return stat.S_ISREG(os.stat(backing).st_mode) and reflink.supports_reflink(backing)
        except (OperationError, OSError):
            return False

    def flush(self, disk: RawDisk) -> None:
        """Write back the loop device's page cache, then the backing file's dirty pages."""
        node, backing = self._loop(disk)
        snapshots.sync_file(node.path or str(disk.source_path), follow_links=True)
        snapshots.sync_file(backing)

    def snapshot(self, disk: RawDisk, name: str) -> snapshots.StorageSnapshot:
        """Flush the loop device and clone its backing file."""
        snapshots.check_name(name)
        node, backing = self._loop(disk)
        device = node.path or str(disk.source_path)
        snapshots.sync_file(device, follow_links=True)
        clone = clones.make_clone(backing, name)
        created = snapshots.utc_now()
        offset = int(node.identity.get("offset") or 0)
        return snapshots.StorageSnapshot(
            agent=self.name,
            disk=disk.target,
            name=name,
            created=created,
            size=node.size or 0,
            handle={
                "device": device,
                "devnum": node.identity.get("dev"),
                "backing": backing,
                "clone": clone,
                "offset": offset,
                "sizelimit": int(node.identity.get("sizelimit") or 0),
            },
        )

    def _expected(self, disk: RawDisk, name: str) -> tuple[str, dict[str, Any]]:
        """The backing file of ``disk`` and the handle entries of its snapshot ``name``."""
        node, backing = self._loop(disk)
        offset = int(node.identity.get("offset") or 0)
        return backing, {"backing": backing, "clone": clones.clone_path(backing, name),
                         "offset": offset}

    def owns(self, disk: RawDisk, snap: snapshots.StorageSnapshot) -> str | None:
        """None when ``snap`` is a clone of this loop device's backing file, in its snapshot
        directory, under the snapshot's own name; else why not."""
        try:
            backing, expected = self._expected(disk, snap.name)
        except RdmBackupError as err:
            return err.message
        return (snapshots.handle_problem(self.name, disk, snap, expected)
                or clones.clone_problem(backing, snap.name))

    def present(self, disk: RawDisk, snap: snapshots.StorageSnapshot) -> snapshots.Presented:
        """The clone file, read from the loop offset."""
        snapshots.refuse_foreign(self, disk, snap)
        if not self.exists(disk, snap):
            raise StorageError(f"snapshot {snap.name} of {snap.disk} is gone")
        return snapshots.Presented(snapshots.handle_str(snap, "clone"),
                                   snapshots.handle_int(snap, "offset"))

    def withdraw(self, disk: RawDisk, snap: snapshots.StorageSnapshot) -> None:
        """Nothing to do: the clone is read in place."""
        snapshots.refuse_foreign(self, disk, snap)

    def changed_ranges(
        self, disk: RawDisk, older: snapshots.StorageSnapshot, newer: snapshots.StorageSnapshot
    ) -> list[tuple[int, int]] | None:
        """Disk ranges whose blocks differ between the clones; None when not comparable."""
        return snapshots.clones_changed(self, disk, older, newer,
                                        snapshots.handle_int(newer, "offset"))

    def exists(self, disk: RawDisk, snap: snapshots.StorageSnapshot) -> bool:
        """True while the clone exists (a regular file)."""
        snapshots.refuse_foreign(self, disk, snap)
        return clones.clone_exists(snapshots.handle_str(snap, "backing"), snap.name)

    def prune(self, disk: RawDisk, prefix: str, keep: set[str]) -> list[str]:
        """Delete unkept clones of this loop device's backing file."""
        _node, backing = self._loop(disk)
        stale = snapshots.stale_clones(backing, prefix, keep)
        for name in stale:
            clones.remove_clone(backing, name)
        return stale

    def delete(self, disk: RawDisk, snap: snapshots.StorageSnapshot) -> None:
        """Remove the clone."""
        snapshots.refuse_foreign(self, disk, snap)
        clones.remove_clone(snapshots.handle_str(snap, "backing"), snap.name)
