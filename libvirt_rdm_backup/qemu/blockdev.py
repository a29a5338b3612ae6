"""Block nodes of a running QEMU: finding a disk's node, attaching backup targets."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import NotFoundError, RdmBackupError
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import object_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockDevice:
    """One entry of ``query-block``: the guest device and its top block node."""

    qdev: str
    node_name: str
    driver: str
    size: int
    filename: str


def query_block_devices(monitor: Monitor) -> list[BlockDevice]:
    """Every guest block device with a medium inserted."""
    devices = []
    for entry in monitor.execute("query-block") or []:
        inserted = entry.get("inserted")
        if not inserted:
            continue
        image = inserted.get("image") or {}
        devices.append(
            BlockDevice(
                qdev=str(entry.get("qdev") or entry.get("device") or ""),
                node_name=str(inserted.get("node-name", "")),
                driver=str(inserted.get("drv", "")),
                size=int(image.get("virtual-size", 0)),
                filename=str(inserted.get("file", "")),
            )
        )
    return devices


def qdev_alias(qdev: str) -> str:
    """The libvirt alias in a qdev path (``/machine/peripheral/ALIAS/virtio-backend``)."""
    parts = [p for p in qdev.split("/") if p]
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return parts[-1] if parts else ""


def find_device(monitor: Monitor, alias: str) -> BlockDevice:
    """The block device of the disk with libvirt alias ``alias`` (looked up fresh)."""
    for device in query_block_devices(monitor):
        if qdev_alias(device.qdev) == alias:
            return device
    raise NotFoundError(f"QEMU has no block device for disk alias {alias!r}")


@dataclass
class AttachedImage:
    """A backup target image attached to QEMU as a block node."""

    node_name: str
    fdset_id: int


def _free_fdset_id(monitor: Monitor) -> int:
    used = {int(s["fdset-id"]) for s in monitor.execute("query-fdsets") or []}
    candidate = 4000
    while candidate in used:
        candidate += 1
    return candidate


@contextmanager
def added_target_node(monitor: Monitor, options: dict[str, Any], name: str) -> Iterator[str]:
    """``blockdev-add`` of a node a job writes into (zeros unmapped), as ``name``; it is
    deleted when the block ends."""
    monitor.execute("blockdev-add", {**options, "node-name": name, "discard": "unmap",
                                     "detect-zeroes": "unmap"})
    try:
        yield name
    finally:
        with suppress(RdmBackupError):
            monitor.execute("blockdev-del", {"node-name": name})


@contextmanager
def attached_image(
    monitor: Monitor, path: str, fmt: str, disk: str, options: dict[str, Any] | None = None
) -> Iterator[AttachedImage]:
    """Attach the image file ``path`` to QEMU as a writable node for the context's life.

    The file is opened here and its descriptor handed to QEMU (``add-fd``), so
    QEMU's user needs no access to the repository. Zero writes become zero
    clusters (``detect-zeroes=unmap``): all-zero ranges take no space.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fdset_id = _free_fdset_id(monitor)
        monitor.execute(
            "add-fd", {"fdset-id": fdset_id, "opaque": object_name("fd", disk)}, files=[fd]
        )
    finally:
        os.close(fd)
    node_name = object_name("target", disk)
    node: dict[str, Any] = {
        "driver": fmt,
        "node-name": node_name,
        "discard": "unmap",
        "detect-zeroes": "unmap",
        "file": {"driver": "file", "filename": f"/dev/fdset/{fdset_id}"},
    }
    node.update(options or {})
    try:
        monitor.execute("blockdev-add", node)
    except RdmBackupError:
        with suppress(RdmBackupError):
            monitor.execute("remove-fd", {"fdset-id": fdset_id})
        raise
    try:
        yield AttachedImage(node_name=node_name, fdset_id=fdset_id)
    except BaseException:
        _detach(monitor, node_name, fdset_id, after_error=True)
        raise
    _detach(monitor, node_name, fdset_id, after_error=False)


def _detach(monitor: Monitor, node_name: str, fdset_id: int, after_error: bool) -> None:
    """Remove the node and its fd set; a failure is only worth a warning on success
    (after an error the run reports that error, and the next run removes leftovers)."""
    try:
        monitor.execute("blockdev-del", {"node-name": node_name})
    except RdmBackupError as err:
        (log.info if after_error else log.warning)(
            "could not remove block node %s: %s", node_name, err)
    with suppress(RdmBackupError):
        monitor.execute("remove-fd", {"fdset-id": fdset_id})
