"""Mapping RBD disks (``<source protocol='rbd'>``): the image, and the RADOS objects under it.

The tree is two nodes: an ``rbd-image`` (identity: cluster fsid, monitors, pool
name and id, image name and id, size, object size, features, data object
prefix, ...) whose single extent covers the disk, onto ``rados-objects``: the
objects ``<block_name_prefix>.<16 hex digits>`` of ``object_size`` bytes in the
data pool that hold its bytes.
"""

from __future__ import annotations

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import rbd
from libvirt_rdm_backup.storage.base import Extent, StorageNode


class RbdAgent:
    """Maps a libvirt RBD disk to its image through librbd."""

    name = "rbd"

    def can_map(self, disk: RawDisk) -> bool:
        """True for a disk whose source is an RBD image."""
        return disk.rbd is not None

    def map(self, disk: RawDisk) -> StorageNode:
        """The image and its objects (raises StorageError)."""
        if disk.rbd is None:
            raise StorageError(f"disk {disk.target} is not an RBD disk")
        return image_node(disk.rbd, f"disk {disk.target}")


def image_node(source: RbdSource, what: str) -> StorageNode:
    """The ``rbd-image`` node of ``source`` with its ``rados-objects`` (raises StorageError)."""
    facts = rbd.image_facts(source, what)
    objects = -(-facts.size // facts.object_size) if facts.object_size else 0
    data = StorageNode(
        kind="rados-objects",
        name=f"{facts.block_name_prefix}.*",
        size=facts.size,
        identity={
            "cluster_fsid": facts.cluster_fsid,
            "pool_id": facts.data_pool_id,
            "namespace": facts.namespace,
            "object_prefix": facts.block_name_prefix,
            "object_size": facts.object_size,
            "objects": objects,
            "stripe_unit": facts.stripe_unit,
            "stripe_count": facts.stripe_count,
        },
    )
    return StorageNode(
        kind="rbd-image",
        name=source.name,
        path=source.url,
        size=facts.size,
        identity=facts.to_dict(),
        extents=[Extent(0, facts.size, 0, data)],
    )
