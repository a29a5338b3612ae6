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
    RBD = "rbd"  # <disk type='network'><source protocol='rbd'>: a Ceph RBD image (librbd in QEMU)


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


@dataclass(frozen=True)
class RbdSource:
    """A Ceph RBD image as QEMU's rbd driver addresses it (from ``<source protocol='rbd'>``).

    ``hosts`` are the monitors the domain names (empty: the cluster's config file says);
    ``user`` and ``secret_uuid``/``secret_usage`` are the cephx user and the libvirt
    ``ceph`` secret holding its key (never the key itself).
    """

    pool: str
    image: str
    namespace: str | None = None
    snapshot: str | None = None
    hosts: tuple[tuple[str, int | None], ...] = ()
    user: str | None = None
    secret_uuid: str | None = None
    secret_usage: str | None = None
    config_file: str | None = None

    @property
    def name(self) -> str:
        """``pool/image`` (``pool/namespace/image`` in a namespace)."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)

    @property
    def url(self) -> str:
        """``rbd:pool/image`` (with ``@snapshot`` when the disk is a snapshot)."""
        return f"rbd:{self.name}" + (f"@{self.snapshot}" if self.snapshot else "")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RbdSource:
        """Inverse of ``asdict`` (raises KeyError/TypeError/ValueError when malformed)."""
        return cls(
            pool=str(data["pool"]),
            image=str(data["image"]),
            namespace=data.get("namespace"),
            snapshot=data.get("snapshot"),
            hosts=tuple((str(h), None if p is None else int(p))
                        for h, p in data.get("hosts") or ()),
            user=data.get("user"),
            secret_uuid=data.get("secret_uuid"),
            secret_usage=data.get("secret_usage"),
            config_file=data.get("config_file"),
        )


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
    rbd: RbdSource | None = None
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
        """A one-string description of the source (path, iSCSI URL or ``rbd:pool/image``)."""
        if self.iscsi is not None:
            return self.iscsi.url
        if self.rbd is not None:
            return self.rbd.url
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
        iscsi, rbd = data.get("iscsi"), data.get("rbd")
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
            rbd=RbdSource.from_dict(rbd) if isinstance(rbd, dict) else None,
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
