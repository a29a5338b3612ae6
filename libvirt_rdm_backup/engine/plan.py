"""The plan: for each disk, which data path and level, decided once from facts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import UsageError


class DataPath(StrEnum):
    """How a disk's bytes reach the repository."""

    QEMU = "qemu"  # a blockdev-backup job in the running QEMU (copy-before-write)
    STORAGE = "storage"  # read from the storage side (host device or iSCSI LUN)


@dataclass(frozen=True)
class DiskPlan:
    """What will be done for one disk, and why."""

    disk: RawDisk
    path: DataPath
    level: str
    reason: str


def plan_disk(disk: RawDisk, running: bool) -> DiskPlan:
    """Choose the data path of one disk for a full backup."""
    if not running:
        reason = "domain is not running: copied from storage"
        return DiskPlan(disk, DataPath.STORAGE, "full", reason)
    if disk.is_passthrough_lun:
        return DiskPlan(
            disk,
            DataPath.STORAGE,
            "full",
            "SCSI passthrough LUN: guest I/O bypasses QEMU's block layer, "
            "copied from storage while the guest is paused",
        )
    if not disk.node_name:
        raise UsageError(f"disk {disk.target}: QEMU has no block node for it")
    return DiskPlan(disk, DataPath.QEMU, "full", "QEMU block job (copy-before-write)")


def plan_backup(disks: list[RawDisk], running: bool) -> list[DiskPlan]:
    """Plans for every selected disk."""
    return [plan_disk(disk, running) for disk in disks]
