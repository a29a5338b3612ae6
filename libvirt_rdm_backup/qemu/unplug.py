"""Disks unplugged from the guest while a backup job reads them.

A job holds the disk's block nodes, so libvirt's own removal of them fails when a disk is
unplugged under it (the guest device goes, the nodes stay open in QEMU). The backup then
fails; once the jobs are gone, :func:`release_unplugged` removes what libvirt could not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import suppress

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import OperationError, RdmBackupError
from libvirt_rdm_backup.qemu.blockdev import qdev_alias, query_block_devices
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import is_ours


def unplugged(monitor: Monitor, disks: Iterable[RawDisk]) -> list[RawDisk]:
    """The disks whose guest device is gone, or now sits on another node than theirs.

    A job's filter above the disk's node (auto-named ``#block...``, or one of ours) shows
    as the device's node while the job runs.
    """
    devices = {qdev_alias(d.qdev): d.node_name for d in query_block_devices(monitor)}
    gone = []
    for disk in disks:
        if disk.alias is None:
            continue  # not found by its alias in the first place
        node = devices.get(disk.alias)
        if node is None or (node not in (disk.node_name, "") and not node.startswith("#")
                            and not is_ours(node)):
            gone.append(disk)
    return gone


def unplug_check(monitor: Monitor, disks: Iterable[RawDisk]) -> Callable[[], None]:
    """A check that raises OperationError when one of ``disks`` was unplugged."""
    watched = list(disks)

    def check() -> None:
        gone = unplugged(monitor, watched)
        if gone:
            raise OperationError(f"disk {gone[0].target} was unplugged from the domain during "
                                 "the backup; nothing was published")
    return check


def release_unplugged(monitor: Monitor, disks: Iterable[RawDisk]) -> None:
    """Delete the block nodes of unplugged ``disks`` that nothing uses any more (cleanup).

    QEMU refuses to delete a node that is still in use, so only what the unplug left
    behind goes: the disk's format node, then its storage node (libvirt's
    ``NAME-format`` over ``NAME-storage``).
    """
    with suppress(RdmBackupError):
        for disk in unplugged(monitor, disks):
            node = disk.node_name or ""
            if is_ours(node) or not node:
                continue
            try:
                monitor.execute("blockdev-del", {"node-name": node})
            except RdmBackupError:
                continue
            if node.endswith("-format"):
                with suppress(RdmBackupError):
                    monitor.execute("blockdev-del",
                                    {"node-name": node.removesuffix("-format") + "-storage"})
