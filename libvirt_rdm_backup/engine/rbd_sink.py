"""Where a backup to an ``rbd://`` target writes: one RBD image per disk, a snapshot per point.

QEMU writes a point's changed extents straight into the disk's image through its rbd
driver (the guest's QEMU for a backup job, a private storage daemon for a copy from
storage or of the ranges a storage snapshot reports as changed, which land on the
previous point the image holds); the session then snapshots the image, named after
the backup id, and the manifest, written last into the pool's index object, makes the
point visible. A backup that fails before that leaves its snapshots removed and the
image unlisted;
the next point that builds on a parent first resets the image to the parent's snapshot
when anything was written since (``rollback_to_snap``), so what it does not write is the
parent's, never what a failed run or another writer of the pool left.

The cephx key reaches the guest's QEMU through a descriptor (``add-fd``) that a
``secret`` object reads (``file=/dev/fd/N``): libvirt, which logs QMP at debug level,
never sees it. A private storage daemon gets it over QMP (redacted in debug logs).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, Protocol

from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.sinks import Written
from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.qemu.block_copy import Endpoint
from libvirt_rdm_backup.qemu.blockdev import added_target_node
from libvirt_rdm_backup.qemu.jobs import COPY_CHUNK
from libvirt_rdm_backup.qemu.layer_format import PLAIN
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.repository.digest import ALGORITHM, Digest
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.storage.rbd_pool import RbdPool
from libvirt_rdm_backup.targets.uri import RbdAddress

log = logging.getLogger("libvirt_rdm_backup.engine.stores")


def secret_id() -> str:
    """A fresh id of a QEMU ``secret`` object."""
    return f"rdmb-key-{uuid.uuid4().hex[:12]}"


class RbdTarget(Protocol):
    """What of the store (:class:`~.rbd_store.RbdStore`) a session uses."""

    address: RbdAddress
    pool: RbdPool
    name: str

    def image_name(self, domain_uuid: str, disk: str) -> str: ...

    def node(self, image: str, snapshot: str | None, secret: str) -> dict[str, Any]: ...

    def qemu_objects(self, secret: str | None = None) -> tuple[dict[str, Any], ...]: ...

    def write_manifests(self, manifests: list[Manifest], drop: tuple[str, ...] = ()
                        ) -> None: ...


class RbdSink:
    """The session of one backup in an ``rbd://`` target."""

    local_files = False
    layer_format = PLAIN  # the image is raw: neither compressed nor encrypted by the tool

    def __init__(self, store: RbdTarget, domain_uuid: str, backup_id: str) -> None:
        self.store = store
        self.domain_uuid = domain_uuid
        self.backup_id = backup_id
        self.snapshots: list[str] = []  # images snapshotted by this session
        self._secret = secret_id()
        # QEMU's backup job copies in the target's cluster size: the image's object size
        self.copy_chunk = max(COPY_CHUNK, store.address.object_size, 1 << 20)

    def image(self, plan: DiskPlan) -> str:
        """The disk's image in the pool."""
        return self.store.image_name(self.domain_uuid, plan.disk.target)

    def scratch(self, name: str) -> str:
        raise UsageError("an rbd:// target cannot take chunk-compared layers")

    def create(self, plan: DiskPlan) -> None:
        """The disk's image, created thin (or grown) at the disk's size; for a point that
        builds on another, first reset to that point's snapshot if anything else was
        written to it since (what the new point does not write would stay)."""
        image = self.image(plan)
        if plan.parent is not None and self.store.pool.reset_head(image,
                                                                  plan.parent.backup_id):
            log.warning("%s held writes that no point made since backup %s (a backup cut "
                        "short, or another writer); it was reset to that point first",
                        image, plan.parent.backup_id)
        self.store.pool.ensure_image(image, int(plan.disk.size or 0),
                                     self.store.address.object_size)

    def node(self, plan: DiskPlan, secret: str) -> dict[str, Any]:
        """Blockdev options of the disk's image (writable head)."""
        return self.store.node(self.image(plan), None, secret)

    def target(self, plan: DiskPlan) -> str:
        raise UsageError("an rbd:// target cannot take chunk-compared layers")

    def copy_target(self, plan: DiskPlan) -> Endpoint:
        return Endpoint(self.node(plan, self._secret), objects=self.store.qemu_objects(
            self._secret))

    def attach(self, monitor: Monitor, plan: DiskPlan) -> AbstractContextManager[str]:
        secret = secret_id()  # one per node: each is deleted with its node
        return _rbd_node(monitor, self.store.pool.key, self.node(plan, secret), plan, secret)

    def written(self, plan: DiskPlan) -> Written:
        """Snapshot the image; what the point wrote (exact) and what it takes (in objects)."""
        image, pool = self.image(plan), self.store.pool
        pool.create_snapshot(image, self.backup_id)
        self.snapshots.append(image)
        since = plan.parent.backup_id if plan.parent is not None else None
        if since is not None and since not in pool.snapshots(image):
            since = None
        return Written(
            image="", data_file=image,
            stored_bytes=pool.changed(image, self.backup_id, since),
            own_bytes=pool.changed(image, self.backup_id, since, exact=True),
            location={"pool": self.store.address.pool, "image": image,
                      "snapshot": self.backup_id})

    def digest(self, plan: DiskPlan) -> Digest:
        """Digest of the point's snapshot, read once."""
        return Digest(ALGORITHM, self.store.pool.digest(self.image(plan), self.backup_id,
                                                        ALGORITHM))

    def publish(self, manifest: Manifest) -> str:
        """Write the manifest into the index: the point is visible from then on."""
        self.store.write_manifests([manifest])
        self.snapshots = []
        return f"{self.store.name}#{manifest.backup_id}"

    def discard(self) -> None:
        """Remove the snapshots of a backup that was not published (best effort)."""
        for image in self.snapshots:
            try:
                self.store.pool.remove_snapshot(image, self.backup_id)
            except RdmBackupError as err:
                log.warning("cannot remove snapshot %s@%s of an unpublished backup: %s",
                            image, self.backup_id, err)
        self.snapshots = []


@contextmanager
def _rbd_node(monitor: Monitor, key: str, options: dict[str, Any], plan: DiskPlan,
              secret: str) -> Iterator[str]:
    """The image as a node of the guest's QEMU; the key handed over by descriptor."""
    memfd = os.memfd_create("rdmb-key", os.MFD_CLOEXEC)
    try:
        os.write(memfd, key.encode("ascii"))
        added = monitor.execute("add-fd", {}, files=[memfd])
    finally:
        os.close(memfd)
    fdset = int(added["fdset-id"])
    name = object_name("target", plan.disk.target)
    try:
        monitor.execute("object-add", {"qom-type": "secret", "id": secret, "format": "base64",
                                       "file": f"/proc/self/fd/{int(added['fd'])}"})
    finally:
        with suppress(RdmBackupError):
            monitor.execute("remove-fd", {"fdset-id": fdset})
    try:
        with added_target_node(monitor, options, name):
            yield name
    finally:
        with suppress(RdmBackupError):
            monitor.execute("object-del", {"id": secret})
