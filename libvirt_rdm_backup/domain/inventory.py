"""Every domain of a connection, and a domain's disk inventory from its XML alone."""

from __future__ import annotations

import libvirt

from libvirt_rdm_backup.domain.connection import domain_xml, is_running
from libvirt_rdm_backup.domain.discovery import VolumeResolver, inventory_from_xml
from libvirt_rdm_backup.domain.disks import DiskInventory
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.errors import LibvirtError


def volume_resolver(conn: libvirt.virConnect) -> VolumeResolver:
    """Resolves a storage-pool volume to (path, is a block device) through libvirt."""

    def resolve(pool: str, volume: str) -> tuple[str, bool] | None:
        try:
            vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(volume)
            kind = vol.info()[0]
            return str(vol.path()), kind == libvirt.VIR_STORAGE_VOL_BLOCK
        except libvirt.libvirtError:
            return None

    return resolve


def all_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """Every domain of the connection, running or not, persistent or transient."""
    try:
        return list(conn.listAllDomains(0))
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot list domains: {err}") from err


def xml_inventory(conn: libvirt.virConnect, dom: libvirt.virDomain) -> DiskInventory:
    """The domain's raw and other disks, classified from its XML (QEMU is not asked)."""
    text = domain_xml(dom)
    return inventory_from_xml(DomainXML.parse(text), is_running(dom), volume_resolver(conn))
