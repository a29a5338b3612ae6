"""Discovery: a domain's XML → its raw disks with identifiers, and the other disks with reasons."""

from __future__ import annotations

import os
from collections.abc import Callable

from libvirt_rdm_backup.domain.disks import (
    DiskInventory,
    IscsiSource,
    OtherDisk,
    RawDisk,
    RbdSource,
    SourceKind,
)
from libvirt_rdm_backup.domain.xml import DiskXML, DomainXML, HostdevXML
from libvirt_rdm_backup.errors import UsageError

# resolves a storage-pool volume to (path, is_block_device); None when unknown
VolumeResolver = Callable[[str, str], tuple[str, bool] | None]

DEFAULT_ISCSI_PORT = 3260


def parse_iscsi_name(name: str, host: str, port: int | None) -> IscsiSource:
    """``IQN/LUN`` of a libvirt iSCSI source (LUN 0 when absent)."""
    iqn, _, lun_text = name.rpartition("/")
    if not iqn:
        iqn, lun_text = name, "0"
    try:
        lun = int(lun_text)
    except ValueError as err:
        raise UsageError(f"malformed iSCSI source name {name!r}") from err
    return IscsiSource(host=host, port=port or DEFAULT_ISCSI_PORT, iqn=iqn, lun=lun)


def parse_rbd_source(disk: DiskXML) -> RbdSource:
    """The RBD image of a ``<source protocol='rbd' name='POOL[/NAMESPACE]/IMAGE'>`` disk."""
    name = disk.source_name or ""
    image_part, _, snap_in_name = name.partition("@")  # the old pool/image@snap form
    parts = image_part.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"malformed RBD source name {name[:128]!r} (POOL/IMAGE expected)")
    return RbdSource(
        pool=parts[0],
        image=parts[-1],
        namespace=parts[1] if len(parts) == 3 else None,
        snapshot=disk.source_snapshot or snap_in_name or None,
        hosts=tuple(disk.hosts),
        user=disk.auth_username,
        secret_uuid=disk.auth_secret_uuid,
        secret_usage=disk.auth_secret_usage,
        config_file=disk.source_config,
    )


def _other(disk: DiskXML, reason: str, source: str | None = None) -> OtherDisk:
    return OtherDisk(
        target=disk.target_dev or "?",
        device=disk.device,
        source_type=disk.type or "?",
        source=source,
        reason=reason,
    )


def _raw(disk: DiskXML, kind: SourceKind, **fields: object) -> RawDisk:
    return RawDisk(
        target=disk.target_dev or "?",
        source_kind=kind,
        device=disk.device,
        bus=disk.target_bus,
        alias=disk.alias,
        serial=disk.serial,
        wwn=disk.wwn,
        driver_type=disk.driver_type or "raw",
        readonly=bool(disk.readonly),
        **fields,  # type: ignore[arg-type]
    )


def classify_disk(disk: DiskXML, resolve_volume: VolumeResolver | None) -> RawDisk | OtherDisk:
    """Decide whether a ``<disk>`` is a raw disk and collect its identifiers."""
    if disk.device in ("cdrom", "floppy"):
        return _other(disk, f"{disk.device} is removable media, not a raw disk",
                      disk.source_file or disk.source_dev)
    fmt = disk.driver_type or "raw"
    kind = disk.type or "file"
    if kind == "file":
        return _other(disk, f"image file ({fmt}), not a raw disk", disk.source_file)
    if fmt != "raw":
        return _other(disk, f"{fmt} format on {kind} storage, not a raw disk",
                      disk.source_dev or disk.source_name)
    if kind == "block":
        if not disk.source_dev:
            return _other(disk, "block disk without a source device")
        return _raw(disk, SourceKind.BLOCK, source_path=disk.source_dev)
    if kind == "network":
        protocol = disk.source_protocol or "?"
        if protocol == "rbd":
            return _raw(disk, SourceKind.RBD, rbd=parse_rbd_source(disk))
        if protocol != "iscsi":
            return _other(disk, f"network protocol {protocol} is not supported as a raw disk",
                          disk.source_name)
        if not disk.source_name or not disk.host_name:
            return _other(disk, "iSCSI disk without a target name or host", disk.source_name)
        iscsi = parse_iscsi_name(disk.source_name, disk.host_name, disk.host_port)
        return _raw(disk, SourceKind.ISCSI, iscsi=iscsi)
    if kind == "volume":
        pool, volume = disk.source_pool, disk.source_volume
        if not pool or not volume:
            return _other(disk, "volume disk without pool or volume name")
        resolved = resolve_volume(pool, volume) if resolve_volume else None
        if resolved is None:
            return _other(disk, f"volume {pool}/{volume} cannot be resolved", f"{pool}/{volume}")
        path, is_block = resolved
        if not is_block:
            return _other(disk, f"volume {pool}/{volume} ({path}) is not a block device, "
                          "so not a raw disk", path)
        return _raw(disk, SourceKind.VOLUME, source_path=path, pool=pool, volume=volume)
    return _other(disk, f"disk type {kind} is not a raw disk", disk.source_file)


def scsi_host_device(
    adapter: str, bus: int, target: int, unit: int, sysfs_root: str = "/sys"
) -> str | None:
    """The host block device (``/dev/sdX``) of a SCSI address, or None."""
    host = adapter.removeprefix("scsi_host")
    if not host.isdigit():
        return None
    address = f"{host}:{bus}:{target}:{unit}"
    block_dir = os.path.join(sysfs_root, "bus/scsi/devices", address, "block")
    try:
        names = sorted(os.listdir(block_dir))
    except OSError:
        return None
    return f"/dev/{names[0]}" if names else None


def classify_hostdev(
    hostdev: HostdevXML, index: int, sysfs_root: str = "/sys"
) -> RawDisk | None:
    """A SCSI passthrough ``<hostdev>`` as a raw disk (None for other host devices)."""
    if hostdev.type != "scsi" or hostdev.mode not in (None, "subsystem"):
        return None
    name = hostdev.alias or f"hostdev{index}"
    if hostdev.source_protocol == "iscsi" and hostdev.source_name and hostdev.host_name:
        iscsi = parse_iscsi_name(hostdev.source_name, hostdev.host_name, hostdev.host_port)
        return RawDisk(target=name, source_kind=SourceKind.SCSI_HOSTDEV, device="lun",
                       bus="scsi", alias=hostdev.alias, iscsi=iscsi,
                       readonly=bool(hostdev.readonly))
    bus, tgt, unit = hostdev.address_bus, hostdev.address_target, hostdev.address_unit
    path = None
    if hostdev.adapter and bus is not None and tgt is not None and unit is not None:
        path = scsi_host_device(hostdev.adapter, bus, tgt, unit, sysfs_root)
        if path is None:
            path = f"{hostdev.adapter}:{bus}:{tgt}:{unit}"
    return RawDisk(target=name, source_kind=SourceKind.SCSI_HOSTDEV, device="lun", bus="scsi",
                   alias=hostdev.alias, source_path=path, readonly=bool(hostdev.readonly))


def inventory_from_xml(
    xml: DomainXML,
    running: bool,
    resolve_volume: VolumeResolver | None = None,
    sysfs_root: str = "/sys",
) -> DiskInventory:
    """Classify every disk and SCSI host device of a parsed domain."""
    inventory = DiskInventory(
        domain_name=xml.name or "?", domain_uuid=xml.uuid or "?", running=running
    )
    for disk in xml.disks:
        found = classify_disk(disk, resolve_volume)
        if isinstance(found, RawDisk):
            inventory.raw.append(found)
        else:
            inventory.other.append(found)
    for index, hostdev in enumerate(xml.hostdevs):
        raw = classify_hostdev(hostdev, index, sysfs_root)
        if raw is not None:
            inventory.raw.append(raw)
    return inventory
