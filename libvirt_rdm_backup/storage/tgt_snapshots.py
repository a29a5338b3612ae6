"""Snapshots of iSCSI LUNs of the local tgtd whose backing file can be reflinked.

:class:`TgtReflinkAgent` serves disks whose iSCSI portal is on a loopback
address and whose LUN (``tgt.find_lun``) is backed by a regular file on a
filesystem that shares extents (XFS ``reflink=1``, btrfs).

* snapshot: a reflink clone of the backing file, ``<dir>/.rdmb-snapshots/<name>.img``.
  tgtd's ``rdwr`` backing store writes with ``pwrite`` through the page cache
  (no ``O_DIRECT``, no ``O_SYNC``); FICLONE on XFS writes the source's dirty
  pages back before sharing its extents, so the clone holds every write tgtd
  has acknowledged. The caller's window (paused or frozen guest) makes sure no
  write is in flight.
* present: a new target ``<iqn>:<name>`` on a free tid, the clone as LUN 1,
  made read-only, then bound to the loopback initiator address only.
* changed ranges: :func:`reflink.changed_between` of the two clones.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk
from libvirt_rdm_backup.errors import (
    CommandError,
    OperationError,
    RdmBackupError,
    StorageError,
)
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import reflink, tgt
from libvirt_rdm_backup.storage.clones import (
    clone_exists,
    clone_path,
    clone_problem,
    make_clone,
    remove_clone,
)
from libvirt_rdm_backup.storage.iscsi import is_loopback_host
from libvirt_rdm_backup.storage.snapshots import (
    Presented,
    StorageSnapshot,
    check_name,
    clones_changed,
    handle_int,
    handle_problem,
    handle_str,
    refuse_foreign,
    stale_clones,
    sync_file,
    utc_now,
)

log = logging.getLogger(__name__)

FILE_BACKING_STORES = ("rdwr", "aio")
TID_ATTEMPTS = 20
TIMEOUT = 30.0
# (iqn, lun) -> the LUN's source and backing file, found by the flush before a window
_FLUSHED: dict[tuple[str, int], tuple[IscsiSource, str]] = {}


def _tgtadm(*args: str) -> None:
    try:
        run([tgt.TGTADM, "--lld", "iscsi", *args], timeout=TIMEOUT)
    except CommandError as err:
        detail = err.stderr.strip().splitlines()[-1] if err.stderr.strip() else err.message
        raise StorageError(f"tgtadm {' '.join(args[:4])} failed: {detail}") from err
    except OperationError as err:
        raise StorageError(f"cannot run tgtadm: {err.message}") from err


def initiator_address(host: str) -> str:
    """The loopback address an initiator connecting to portal ``host`` comes from."""
    bare = host.strip("[]")
    return "::1" if ":" in bare else "127.0.0.1"


class TgtReflinkAgent:
    """Reflink snapshots of file-backed LUNs of the local tgtd, presented as new targets."""

    name = "tgt-reflink"

    def _backing(self, disk: RawDisk) -> tuple[IscsiSource, str]:
        """The disk's iSCSI source and the backing file of its LUN."""
        source = disk.iscsi
        if source is None or not is_loopback_host(source.host):
            raise StorageError(f"disk {disk.target} is not a LUN of a local tgtd")
        lun = tgt.find_lun(source.iqn, source.lun)
        if lun is None:
            raise StorageError(f"tgtd has no LUN {source.lun} on target {source.iqn}")
        path = lun.backing_store_path
        if lun.backing_store_type not in FILE_BACKING_STORES or not path:
            raise StorageError(
                f"LUN {source.iqn}/{source.lun} has a {lun.backing_store_type or 'null'} "
                "backing store, not a file"
            )
        return source, path

    def can_snapshot(self, disk: RawDisk) -> bool:
        """True for LUNs of a local tgtd backed by a regular file on a reflink filesystem."""
        if disk.iscsi is None or not is_loopback_host(disk.iscsi.host):
            return False
        try:
            if not tgt.tgtadm_available():
                return False
            _source, path = self._backing(disk)
            return stat.S_ISREG(os.stat(path).st_mode) and reflink.supports_reflink(path)
        except (OperationError, OSError):
            return False

    def flush(self, disk: RawDisk) -> None:
        """Write back tgtd's dirty pages of the LUN's backing file (tgtadm has no flush).

        The LUN's backing file found here is kept for the snapshot that follows
        within the window, which then asks tgtd nothing.
        """
        if disk.iscsi is not None:
            _FLUSHED.pop((disk.iscsi.iqn, disk.iscsi.lun), None)  # never an older run's
        source, backing = self._backing(disk)
        sync_file(backing)
        _FLUSHED[(source.iqn, source.lun)] = (source, backing)

    def snapshot(self, disk: RawDisk, name: str) -> StorageSnapshot:
        """Clone the LUN's backing file (one ``tgtadm show`` and one FICLONE)."""
        check_name(name)
        known = _FLUSHED.pop((disk.iscsi.iqn, disk.iscsi.lun), None) if disk.iscsi else None
        source, backing = known if known and known[0] == disk.iscsi else self._backing(disk)
        clone = make_clone(backing, name)
        created = utc_now()
        try:
            size = os.stat(clone).st_size
        except OSError as err:
            raise StorageError(f"cannot stat snapshot file {clone}: {err.strerror}") from err
        return StorageSnapshot(
            agent=self.name,
            disk=disk.target,
            name=name,
            created=created,
            size=size,
            handle={
                "host": source.host,
                "port": source.port,
                "iqn": source.iqn,
                "lun": source.lun,
                "backing": backing,
                "clone": clone,
                "target_iqn": f"{source.iqn}:{name}",
            },
        )

    def _expected(self, disk: RawDisk, name: str) -> tuple[str, dict[str, Any]]:
        """The LUN's backing file and the handle entries of its snapshot ``name``."""
        source, backing = self._backing(disk)
        return backing, {
            "host": source.host, "port": source.port, "iqn": source.iqn, "lun": source.lun,
            "backing": backing, "clone": clone_path(backing, name),
            "target_iqn": f"{source.iqn}:{name}",
        }  # fmt: skip

    def owns(self, disk: RawDisk, snap: StorageSnapshot) -> str | None:
        """None when ``snap`` is a clone of this LUN's backing file in its snapshot directory,
        presented (if at all) as the target this agent names after the LUN and the snapshot."""
        try:
            backing, expected = self._expected(disk, snap.name)
        except RdmBackupError as err:
            return err.message
        return handle_problem(self.name, disk, snap, expected) or clone_problem(backing, snap.name)

    def _url(self, snap: StorageSnapshot) -> str:
        source = IscsiSource(
            handle_str(snap, "host"), handle_int(snap, "port"), handle_str(snap, "target_iqn"), 1
        )
        return source.url

    def present(self, disk: RawDisk, snap: StorageSnapshot) -> Presented:
        """Serve the clone read-only as LUN 1 of target ``<iqn>:<name>``, to loopback only."""
        refuse_foreign(self, disk, snap)
        clone = handle_str(snap, "clone")
        target_iqn = handle_str(snap, "target_iqn")
        if not self.exists(disk, snap):
            raise StorageError(f"snapshot {snap.name} of {snap.disk} is gone ({clone})")
        existing = tgt.find_target(target_iqn)
        if existing is not None:
            lun = existing.lun(1)
            if lun is not None and lun.backing_store_path == clone and lun.readonly:
                return Presented(self._url(snap))
            _tgtadm("--op", "delete", "--mode", "target", "--tid", str(existing.tid), "--force")
        tid = self._new_target(target_iqn)
        try:
            _tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                    "-b", clone)  # fmt: skip
            _tgtadm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                    "--params", "readonly=1")  # fmt: skip
            _tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid),
                    "--initiator-address", initiator_address(handle_str(snap, "host")))  # fmt: skip
        except BaseException:
            try:
                _tgtadm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
            except StorageError as err:
                log.error("cannot remove half-made target %s: %s", target_iqn, err)
            raise
        return Presented(self._url(snap))

    def _new_target(self, iqn: str) -> int:
        """Create target ``iqn`` on the lowest unused tid above the used ones."""

        def attempt() -> int:
            tid = max((t.tid for t in tgt.show_targets()), default=0) + 1
            try:
                _tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
            except StorageError as err:  # taken meanwhile by someone else: try the next
                raise retry.Again() from err
            return tid

        tid: int = retry.tgt_tid_allocation(iqn, TID_ATTEMPTS)(attempt)
        return tid

    def withdraw(self, disk: RawDisk, snap: StorageSnapshot) -> None:
        """Delete the target that presents the snapshot, if any."""
        refuse_foreign(self, disk, snap)
        self._remove_target(handle_str(snap, "target_iqn"))

    def _remove_target(self, iqn: str) -> None:
        target = tgt.find_target(iqn)
        if target is not None:
            _tgtadm("--op", "delete", "--mode", "target", "--tid", str(target.tid), "--force")

    def changed_ranges(
        self, disk: RawDisk, older: StorageSnapshot, newer: StorageSnapshot
    ) -> list[tuple[int, int]] | None:
        """Ranges whose blocks differ between the two clones; None for different LUNs or sizes."""
        return clones_changed(self, disk, older, newer, 0)

    def exists(self, disk: RawDisk, snap: StorageSnapshot) -> bool:
        """True while the clone exists (a regular file)."""
        refuse_foreign(self, disk, snap)
        return clone_exists(handle_str(snap, "backing"), snap.name)

    def prune(self, disk: RawDisk, prefix: str, keep: set[str]) -> list[str]:
        """Delete unkept clones of this LUN, and the targets presenting them."""
        source, backing = self._backing(disk)
        stale = stale_clones(backing, prefix, keep)
        for name in stale:
            self._remove_target(f"{source.iqn}:{name}")
            remove_clone(backing, name)
        return stale

    def delete(self, disk: RawDisk, snap: StorageSnapshot) -> None:
        """Withdraw, then remove the clone."""
        self.withdraw(disk, snap)
        remove_clone(handle_str(snap, "backing"), snap.name)
