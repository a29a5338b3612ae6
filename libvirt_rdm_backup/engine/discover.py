"""The VM manager side: find a domain, list its raw disks, fill live facts from QEMU."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import libvirt

from libvirt_rdm_backup.domain.connection import (
    domain_xml,
    is_running,
    lookup_domain,
    secret_value,
)
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import DiskInventory, OtherDisk, RawDisk, RbdSource
from libvirt_rdm_backup.domain.inventory import volume_resolver
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.errors import (
    NotFoundError,
    NotRawDiskError,
    RdmBackupError,
    StorageError,
    UsageError,
)
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.blockdev import qdev_alias, query_block_devices
from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor
from libvirt_rdm_backup.repository.ids import check_safe_name
from libvirt_rdm_backup.storage import rbd

log = logging.getLogger(__name__)


@dataclass
class DomainContext:
    """A looked-up domain with its XML and disk inventory."""

    dom: libvirt.virDomain
    xml_text: str
    inventory: DiskInventory

    @property
    def uuid(self) -> str:
        """The domain's UUID."""
        return self.inventory.domain_uuid

    @property
    def name(self) -> str:
        """The domain's name."""
        return self.inventory.domain_name


def offline_size(disk: RawDisk) -> int:
    """Size of a raw disk read from its source (the domain need not run)."""
    if disk.rbd is not None:
        return rbd.image_size(disk.rbd, f"disk {disk.target}")
    source = disk.source
    if not source or (disk.iscsi is None and not source.startswith("/")):
        raise StorageError(f"disk {disk.target}: no readable source to size")
    try:
        return img.virtual_size(source, "raw")  # qemu-img info: one size, nothing moved
    except RdmBackupError as err:
        raise StorageError(f"disk {disk.target}: cannot read size of {source}: {err}") from err


def fill_live_facts(dom: libvirt.virDomain, inventory: DiskInventory) -> None:
    """Set each raw disk's QEMU node name and size (fresh from ``query-block``)."""
    if inventory.running:
        devices = {qdev_alias(d.qdev): d for d in query_block_devices(LibvirtMonitor(dom))}
        for disk in inventory.raw:
            device = devices.get(disk.alias or "")
            if device is not None:
                disk.node_name = device.node_name
                disk.size = device.size
    for disk in inventory.raw:
        if disk.size is None:
            try:
                disk.size = offline_size(disk)
            except StorageError:
                disk.size = None


def remember_rbd_keys(conn: libvirt.virConnect, inventory: DiskInventory) -> None:
    """Read the cephx key of each RBD disk's libvirt secret for :mod:`.storage.rbd`.

    A secret libvirt does not reveal is passed over (debug log): the disk's mapping
    then names the missing key, or uses ``RDM_BACKUP_CEPH_KEYRING``.
    """
    for disk in inventory.raw:
        if disk.rbd is not None:
            learn_rbd_key(conn, disk.rbd)


def learn_rbd_key(conn: libvirt.virConnect | None, source: RbdSource) -> None:
    """Read the key of an RBD source's libvirt secret, when it has one, libvirt answers
    and reveals it (else a debug line)."""
    if conn is None or rbd.secret_ref(source) is None or rbd.knows_key(source):
        return
    try:
        rbd.remember_key(source, secret_value(conn, source.secret_uuid, source.secret_usage))
    except RdmBackupError as err:
        log.debug("%s: %s", source.name, err)


def open_domain(conn: libvirt.virConnect, name_or_uuid: str, live: bool = True) -> DomainContext:
    """Look a domain up and classify its disks (``live``: ask QEMU for nodes and sizes)."""
    dom = lookup_domain(conn, name_or_uuid)
    running = is_running(dom)
    text = domain_xml(dom)
    inventory = inventory_from_xml(DomainXML.parse(text), running, volume_resolver(conn))
    remember_rbd_keys(conn, inventory)
    if live:
        fill_live_facts(dom, inventory)
    return DomainContext(dom=dom, xml_text=text, inventory=inventory)


def select_disks(inventory: DiskInventory, names: list[str] | None) -> list[RawDisk]:
    """The raw disks named by ``names`` (all raw disks when empty).

    Raises NotRawDiskError for a named disk that is not raw, NotFoundError for
    an unknown one, UsageError for a malformed name or when the domain has no raw
    disk at all.
    """
    for name in names or ():
        check_safe_name(name, "disk name")
    if not names:
        if not inventory.raw:
            raise UsageError(f"domain {inventory.domain_name} has no raw disks")
        return list(inventory.raw)
    selected: list[RawDisk] = []
    for name in names:
        disk = inventory.find(name)
        if disk is None:
            raise NotFoundError(f"domain {inventory.domain_name} has no disk {name!r}")
        if isinstance(disk, OtherDisk):
            raise NotRawDiskError(name, disk.reason)
        if disk not in selected:
            selected.append(disk)
    return selected
