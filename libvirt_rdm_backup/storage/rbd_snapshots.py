"""Snapshots of Ceph RBD images through librbd: the ``rbd`` snapshot agent.

:class:`RbdSnapshotAgent` serves libvirt RBD disks (``<source protocol='rbd'>``) of a
running or shut-off domain, as the disk's cephx user (:mod:`.rbd` holds the credentials),
and iSCSI LUNs of the local tgtd whose backing store is an RBD image (:mod:`.tgt_rbd`:
the image tgtadm names, checked to be the one tgtd holds open, as the client
``RDM_BACKUP_TGT_RBD`` names).

* flush (before the window): connect and open the image, so that the window holds
  only the snapshot request itself.
* snapshot: ``Image.create_snap`` (what ``rbd snap create`` does). While QEMU holds the
  image's exclusive lock, librbd asks QEMU's librbd to take it: QEMU flushes its cache
  and blocks writes for that moment, so the snapshot holds every acknowledged write.
  The disks of one domain are snapshotted one after another while the guest is held.
  A LUN's image with exclusive-lock gets the same from tgtd's librbd (the lock owner).
* present: nothing to set up; QEMU's rbd driver reads ``snapshot=<name>`` of the image
  (the engine's storage reads). The changed ranges of an image that is not a clone hold
  only written data, or zeros in both snapshots (an object new since the older snapshot is
  reported from its start): ``written_ranges``.
* changed ranges: ``Image.diff_iterate`` from the older snapshot to the newer one; with
  a valid fast-diff object map first by whole objects (no OSD reads), then exactly
  within the objects it names.
* the handle: cluster fsid, pool (name and id), namespace, image (name and id) and the
  snapshot's id; never a key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import replace
from typing import Any

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, RbdSource
from libvirt_rdm_backup.errors import RdmBackupError, StorageError
from libvirt_rdm_backup.storage import rbd as ceph
from libvirt_rdm_backup.storage import tgt_rbd
from libvirt_rdm_backup.storage.snapshots import (
    Presented,
    StorageSnapshot,
    check_name,
    handle_int,
    handle_problem,
    in_scope,
    utc_now,
)

log = logging.getLogger(__name__)

USER_NAMESPACE = 0  # RBD_SNAP_NAMESPACE_TYPE_USER: snapshots made by name (not group/trash)


class _Opened:
    """The disk's image opened writable before the window, for the snapshot inside it."""

    def __init__(self, stack: ExitStack, source: RbdSource, image: Any,
                 identity: dict[str, Any]) -> None:
        self.stack, self.source, self.image, self.identity = stack, source, image, identity


# (target, the disk's own source) -> the image flush() opened
_FLUSHED: dict[tuple[str, RbdSource | IscsiSource | None], _Opened] = {}
_WARNED: set[tuple[str, str]] = set()  # (disk, why) of LUNs on RBD served without snapshots


def _source(disk: RawDisk) -> RbdSource:
    """The disk's image: its own (an RBD disk), or its tgt rbd LUN's (asks tgtd)."""
    source = disk.rbd if disk.rbd is not None else tgt_rbd.disk_image(disk)
    if source is None or source.snapshot:
        raise StorageError(f"disk {disk.target} is not a writable Ceph RBD image")
    return source


def _key(disk: RawDisk) -> tuple[str, RbdSource | IscsiSource | None]:
    return disk.target, disk.rbd if disk.rbd is not None else disk.iscsi


def _identity(handle: Any, source: RbdSource, image: Any) -> dict[str, Any]:
    """The handle entries that name the image: they hold stable ids, not only names."""
    return {"cluster_fsid": str(handle.get_fsid()), "pool": source.pool,
            "pool_id": int(handle.pool_lookup(source.pool)), "namespace": source.namespace,
            "image": source.image, "image_id": str(image.id())}  # fmt: skip


def _user_snaps(image: Any) -> dict[str, int]:
    """The image's user snapshots: name -> id."""
    return {str(s["name"]): int(s["id"]) for s in image.list_snaps()
            if int(s.get("namespace", USER_NAMESPACE)) == USER_NAMESPACE}


def _fails(what: str, err: Exception) -> StorageError:
    return StorageError(f"{what}: {type(err).__name__}: {str(err)[:200]}")


@contextmanager
def _image(disk: RawDisk, what: str, snapshot: str | None = None, writable: bool = False,
           check: bool = False) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The disk's image (at ``snapshot`` when given) and its identity; with ``check``, a
    LUN's image is first proven to be the one tgtd serves (StorageError)."""
    source = replace(_source(disk), snapshot=snapshot)
    with ceph.open_image(source, what, writable=writable, shared=True) as (handle, _ioctx,
                                                                          image):
        try:
            identity = _identity(handle, source, image)
            problem = (tgt_rbd.served_problem(handle, image, disk.size)
                       if check and disk.rbd is None else None)
        except (ceph.rados.Error, ceph.rbd.Error) as err:
            raise _fails(what, err) from err
        if problem:
            raise StorageError(f"{what}: RBD image {source.name} behind LUN "
                               f"{disk.source}: {problem}")
        yield image, identity


def _no_snapshots(disk: RawDisk, err: RdmBackupError) -> None:
    """Log why the disk gets no RBD snapshots: a warning (once) for a LUN on RBD."""
    if disk.rbd is not None:
        log.info("disk %s: no RBD snapshots: %s", disk.target, err)
    elif (disk.target, err.message) not in _WARNED:
        _WARNED.add((disk.target, err.message))
        log.warning("disk %s is a LUN on Ceph RBD but gets no RBD snapshots (it is copied "
                    "from storage instead): %s", disk.target, err.message)


@contextmanager
def _owned(disk: RawDisk, snap: StorageSnapshot, what: str, snapshot: str | None = None,
           writable: bool = False) -> Iterator[Any]:
    """The disk's image (at ``snapshot``), opened once, after checking that ``snap`` is
    one this agent made of it (raises StorageError as :func:`refuse_foreign` does)."""
    with _image(disk, what, snapshot, writable) as (image, identity):
        problem = handle_problem(RbdSnapshotAgent.name, disk, snap, identity)
        if problem:
            raise StorageError(f"snapshot {snap.name!r} of {disk.target} is not one "
                               f"rbd made of it, left untouched: {problem}")
        yield image


def _is_clone(image: Any) -> bool:
    """True when the image has a parent (or may have: unknown counts as one). A clone's
    first write to an object copies the parent's object up, and the diff then reports the
    whole object, unchanged data included."""
    try:
        image.get_parent_image_spec()
    except ceph.rbd.ImageNotFound:
        return False
    except ceph.rbd.Error:
        return True
    return True


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[0] + last[1], offset + length) - last[0])
        elif length > 0:
            merged.append((offset, length))
    return merged


def diff_ranges(image: Any, older: str, size: int) -> list[tuple[int, int]]:
    """Ranges of ``image`` (opened at the newer snapshot) that differ from snapshot
    ``older``: whole objects from a valid fast-diff map first, then the exact extents
    within them; exact over the whole image when there is no usable map."""
    found: list[tuple[int, int]] = []

    def collect(offset: int, length: int, _exists: bool) -> int:
        found.append((int(offset), int(length)))
        return 0

    fast = (int(image.features()) & int(ceph.rbd.RBD_FEATURE_FAST_DIFF)
            and not int(image.flags()) & int(ceph.rbd.RBD_FLAG_FAST_DIFF_INVALID))
    if not fast:
        image.diff_iterate(0, size, older, collect, include_parent=True, whole_object=False)
        return _merge(found)
    image.diff_iterate(0, size, older, collect, include_parent=True, whole_object=True)
    objects, found = _merge(found), []
    for offset, length in objects:
        image.diff_iterate(offset, min(length, size - offset), older, collect,
                           include_parent=True, whole_object=False)
    return _merge(found)


class RbdSnapshotAgent:
    """RBD snapshots of a libvirt RBD disk's image, read back through QEMU's rbd driver."""

    name = "rbd"

    def can_snapshot(self, disk: RawDisk) -> bool:
        """True for an RBD disk (not a snapshot itself) whose image this host can open, and
        for a LUN of the local tgtd on an RBD image it can open and prove tgtd serves."""
        if disk.rbd is not None and (disk.rbd.snapshot or not ceph.HAVE_RBD):
            return False
        try:
            if disk.rbd is None and tgt_rbd.rbd_lun(disk.iscsi) is None:
                return False
            with _image(disk, f"disk {disk.target}", check=True):
                return True
        except RdmBackupError as err:
            _no_snapshots(disk, err)
            return False

    def holds_writes(self, disk: RawDisk) -> bool:
        """True when the snapshot alone holds every write acknowledged before it, the guest
        not held: QEMU's librbd (an RBD disk), or tgtd's, which owns the exclusive lock the
        request goes to (a LUN on an image with exclusive-lock)."""
        if disk.rbd is not None:
            return True
        try:
            with _image(disk, f"disk {disk.target}") as (image, _identity_now):
                lock = int(ceph.rbd.RBD_FEATURE_EXCLUSIVE_LOCK)
                return bool(int(image.features()) & lock)
        except (RdmBackupError, ceph.rbd.Error) as err:
            log.info("disk %s: the guest is held for the snapshot: %s", disk.target, err)
            return False

    def flush(self, disk: RawDisk) -> None:
        """Connect and open the image before the window (the snapshot then only asks)."""
        old = _FLUSHED.pop(_key(disk), None)
        if old is not None:
            old.stack.close()
        stack = ExitStack()
        try:
            image, identity = stack.enter_context(
                _image(disk, f"disk {disk.target}", writable=True, check=True))
        except BaseException:
            stack.close()
            raise
        _FLUSHED[_key(disk)] = _Opened(stack, _source(disk), image, identity)

    def snapshot(self, disk: RawDisk, name: str) -> StorageSnapshot:
        """``create_snap`` of the disk's image; refuses an existing name."""
        check_name(name)
        what = f"disk {disk.target}: snapshot {name}"
        opened = _FLUSHED.pop(_key(disk), None)
        with ExitStack() as stack:
            if opened is not None:
                stack.push(opened.stack)
                image, identity = opened.image, opened.identity
            else:
                image, identity = stack.enter_context(_image(disk, what, writable=True,
                                                             check=True))
            try:
                image.create_snap(name)
                created = utc_now()
                snap_id = _user_snaps(image)[name]
                size = int(image.size())
            except (ceph.rbd.Error, KeyError) as err:  # ImageExists: the name is taken
                raise _fails(what, err) from err
        return StorageSnapshot(agent=self.name, disk=disk.target, name=name, created=created,
                               size=size, handle={**identity, "snap_id": snap_id})

    def owns(self, disk: RawDisk, snap: StorageSnapshot) -> str | None:
        """None when ``snap`` names a snapshot of this disk's image (same cluster, pool and
        image ids) by its own name."""
        try:
            with _image(disk, f"disk {disk.target}") as (_image_obj, identity):
                return handle_problem(self.name, disk, snap, identity)
        except RdmBackupError as err:
            return err.message

    def present(self, disk: RawDisk, snap: StorageSnapshot) -> Presented:
        """The image at the snapshot, for QEMU's rbd driver (nothing is set up)."""
        with _owned(disk, snap, f"disk {disk.target}") as image:
            if _user_snaps(image).get(snap.name) != handle_int(snap, "snap_id"):
                raise StorageError(f"snapshot {snap.name} of {snap.disk} is gone")
            clone = _is_clone(image)
        source = replace(_source(disk), snapshot=snap.name)
        return Presented(source.url, 0, rbd=source, written_ranges=not clone)

    def withdraw(self, disk: RawDisk, snap: StorageSnapshot) -> None:
        """Nothing was set up (:meth:`present` checked the snapshot): nothing to undo."""

    def changed_ranges(
        self, disk: RawDisk, older: StorageSnapshot, newer: StorageSnapshot
    ) -> list[tuple[int, int]] | None:
        """``diff_iterate`` ranges between the two snapshots; None when not comparable."""
        what = f"disk {disk.target}: changes since {older.name}"
        try:
            if older.size != newer.size or self.owns(disk, older):
                return None
            with _owned(disk, newer, what, snapshot=newer.name) as image:
                snaps = _user_snaps(image)
                if (snaps.get(older.name) != handle_int(older, "snap_id")
                        or snaps.get(newer.name) != handle_int(newer, "snap_id")):
                    return None
                return diff_ranges(image, older.name, newer.size)
        except Exception as err:  # noqa: BLE001 - unknown means: compare digests instead
            log.info("%s: the cluster cannot tell: %s", what, str(err)[:200])
            return None

    def exists(self, disk: RawDisk, snap: StorageSnapshot) -> bool:
        """True while the image has a snapshot of this name and id."""
        with _owned(disk, snap, f"disk {disk.target}") as image:
            snap_id = handle_int(snap, "snap_id")
            try:
                return _user_snaps(image).get(snap.name) == snap_id
            except ceph.rbd.Error as err:
                raise _fails(f"disk {disk.target}: snapshot {snap.name}", err) from err

    def prune(self, disk: RawDisk, prefix: str, keep: set[str]) -> list[str]:
        """Remove the image's snapshots named ``prefix`` + token that are not kept."""
        what = f"disk {disk.target}: leftover snapshots"
        with _image(disk, what, writable=True) as (image, _identity_now):
            try:
                stale = sorted(n for n in _user_snaps(image) if in_scope(n, prefix)
                               and n not in keep)
                for name in stale:
                    with suppress(ceph.rbd.ImageNotFound):  # removed meanwhile
                        image.remove_snap(name)
            except ceph.rbd.Error as err:
                raise _fails(what, err) from err
        return stale

    def delete(self, disk: RawDisk, snap: StorageSnapshot) -> None:
        """Remove the snapshot (already gone is fine)."""
        what = f"disk {disk.target}: snapshot {snap.name}"
        snap_id = handle_int(snap, "snap_id")
        with _owned(disk, snap, what, writable=True) as image:
            try:
                if _user_snaps(image).get(snap.name) == snap_id:
                    image.remove_snap(snap.name)
            except ceph.rbd.ImageNotFound:
                return  # removed meanwhile
            except ceph.rbd.Error as err:
                raise _fails(what, err) from err
