"""What the tool knows about a VM's disks: raw disks with their identifiers, and the rest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class SourceKind(StrEnum):
    """Where a raw disk's bytes come from, as the domain XML says."""

    BLOCK = "block"  # <disk type='block'>: a host block device (LUN, partition, loop, dm)
    ISCSI = "iscsi"  # <disk type='network'><source protocol='iscsi'>: QEMU's iSCSI initiator
    VOLUME = "volume"  # <disk type='volume'>: a storage-pool volume, resolved to a block path
    SCSI_HOSTDEV = "scsi-hostdev"  # <hostdev mode='subsystem' type='scsi'>: SCSI passthrough


@dataclass(frozen=True)
class IscsiSource:
    """An iSCSI LUN as QEMU's initiator addresses it."""

    host: str
    port: int
    iqn: str
    lun: int

    @property
    def portal(self) -> str:
        """``host:port`` of the target portal."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """libiscsi URL of the LUN (``iscsi://host:port/iqn/lun``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"iscsi://{host}:{self.port}/{self.iqn}/{self.lun}"


@dataclass
class RawDisk:
    """A raw disk of a domain with every identifier the tool records.

    ``device`` is libvirt's device kind: ``disk`` (guest I/O goes through QEMU's
    block layer) or ``lun`` (SCSI commands pass through to the storage).
    """

    target: str
    source_kind: SourceKind
    device: str
    bus: str | None = None
    alias: str | None = None
    serial: str | None = None
    wwn: str | None = None
    source_path: str | None = None  # host block device path (block, volume, hostdev)
    iscsi: IscsiSource | None = None
    driver_type: str | None = "raw"
    readonly: bool = False
    pool: str | None = None  # volume disks: pool and volume names
    volume: str | None = None
    size: int | None = None  # bytes, filled from QEMU or the storage agent
    node_name: str | None = None  # QEMU block node, looked up live

    @property
    def is_passthrough_lun(self) -> bool:
        """True where guest I/O bypasses QEMU's block layer (no jobs, no bitmaps here)."""
        return self.device == "lun" or self.source_kind is SourceKind.SCSI_HOSTDEV

    @property
    def source(self) -> str:
        """A one-string description of the source (path or iSCSI URL)."""
        if self.iscsi is not None:
            return self.iscsi.url
        return self.source_path or ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stable keys, used in manifests and ``--json``)."""
        data = asdict(self)
        data["source_kind"] = str(self.source_kind)
        data["source"] = self.source
        data["passthrough_lun"] = self.is_passthrough_lun
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RawDisk:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        iscsi = data.get("iscsi")
        return cls(
            target=str(data["target"]),
            source_kind=SourceKind(data["source_kind"]),
            device=str(data["device"]),
            bus=data.get("bus"),
            alias=data.get("alias"),
            serial=data.get("serial"),
            wwn=data.get("wwn"),
            source_path=data.get("source_path"),
            iscsi=IscsiSource(**iscsi) if isinstance(iscsi, dict) else None,
            driver_type=data.get("driver_type"),
            readonly=bool(data.get("readonly", False)),
            pool=data.get("pool"),
            volume=data.get("volume"),
            size=data.get("size"),
            node_name=data.get("node_name"),
        )


@dataclass(frozen=True)
class OtherDisk:
    """A disk that is not a raw disk, with the reason it is left out."""

    target: str
    device: str
    source_type: str
    source: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class DiskInventory:
    """All disks of one domain, split into raw disks and the others."""

    domain_name: str
    domain_uuid: str
    running: bool
    raw: list[RawDisk] = field(default_factory=list)
    other: list[OtherDisk] = field(default_factory=list)

    def find(self, target: str) -> RawDisk | OtherDisk | None:
        """The disk with this target dev (raw or not), or None."""
        for raw in self.raw:
            if raw.target == target:
                return raw
        for other in self.other:
            if other.target == target:
                return other
        return None
