"""Storage-side agents: where each raw disk's bytes live, and who the storage says it is.

:func:`map_disk` hands a :class:`RawDisk` to the first agent that can map it
(:func:`default_agents`: RBD images, iSCSI, then local block devices through sysfs) and
returns its :class:`RawDiskMapping`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage.base import RawDiskMapping, StorageAgent
from libvirt_rdm_backup.storage.iscsi import IscsiAgent
from libvirt_rdm_backup.storage.rbd_mapping import RbdAgent
from libvirt_rdm_backup.storage.sysfs import SysfsAgent


def default_agents() -> list[StorageAgent]:
    """The agents :func:`map_disk` tries, in order."""
    sysfs = SysfsAgent()
    return [RbdAgent(), IscsiAgent(sysfs=sysfs), sysfs]


def disk_identifiers(disk: RawDisk) -> dict[str, Any]:
    """The identifiers the domain gives a disk (target, alias, serial, wwn, source)."""
    found: dict[str, Any] = {
        "target": disk.target,
        "alias": disk.alias,
        "serial": disk.serial,
        "wwn": disk.wwn,
        "source": disk.source,
        "source_kind": str(disk.source_kind),
    }
    return {key: value for key, value in found.items() if value}


def map_disk(disk: RawDisk, agents: Sequence[StorageAgent] | None = None) -> RawDiskMapping:
    """The raw disk mapping of ``disk`` from the first agent that can map it.

    Raises StorageError when no agent can (or the chosen agent fails), CommandError
    when a storage tool fails.
    """
    for agent in default_agents() if agents is None else agents:
        if agent.can_map(disk):
            root = agent.map(disk)
            return RawDiskMapping(
                disk=disk.target,
                agent=agent.name,
                root=root,
                identifiers=disk_identifiers(disk),
            )
    raise StorageError(
        f"no storage agent can map disk {disk.target} (source {disk.source or 'unknown'})"
    )
