"""The storage-agent interface and the raw disk mapping document.

A storage agent answers, for one raw disk, *where its bytes live*: a tree of
:class:`StorageNode` objects. Each node is a device or file with its identity
(WWID, serial, vendor, SCSI designators, block sizes, ...) and the extents that
map ranges of it onto the next layer down (a loop device onto its backing file,
a partition onto its parent disk, a dm-linear table onto its slaves, an iSCSI
LUN onto the array's backing store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from libvirt_rdm_backup.domain.disks import RawDisk

MAPPING_FORMAT = "libvirt-rdm-backup/raw-disk-mapping"
MAPPING_VERSION = 1


@dataclass
class Extent:
    """``length`` bytes at ``start`` of the parent node live at ``offset`` of ``target``."""

    start: int
    length: int
    offset: int
    target: StorageNode

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "start": self.start,
            "length": self.length,
            "offset": self.offset,
            "target": self.target.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Extent:
        """Inverse of :meth:`to_dict`."""
        return cls(
            start=int(data["start"]),
            length=int(data["length"]),
            offset=int(data["offset"]),
            target=StorageNode.from_dict(data["target"]),
        )


@dataclass
class StorageNode:
    """One layer of storage: a block device, a file, an iSCSI LUN, an array volume.

    ``kind`` is one of ``loop``, ``partition``, ``dm-linear``, ``dm-multipath``,
    ``dm``, ``md``, ``disk``, ``file``, ``iscsi-lun``, ``tgt-backing-store``.
    ``extents`` is empty for a leaf (a physical disk, a plain file).
    """

    kind: str
    name: str
    path: str | None = None
    size: int | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    extents: list[Extent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind,
            "name": self.name,
            "path": self.path,
            "size": self.size,
            "identity": dict(self.identity),
            "extents": [extent.to_dict() for extent in self.extents],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StorageNode:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=str(data["kind"]),
            name=str(data["name"]),
            path=data.get("path"),
            size=data.get("size"),
            identity=dict(data.get("identity") or {}),
            extents=[Extent.from_dict(e) for e in data.get("extents") or []],
        )

    def leaves(self) -> list[tuple[StorageNode, int, int]]:
        """The bottom-most portions of storage: ``(node, offset, length)`` triples."""
        if not self.extents:
            return [(self, 0, self.size or 0)]
        found: list[tuple[StorageNode, int, int]] = []
        for extent in self.extents:
            for node, offset, length in extent.target.leaves():
                if node is extent.target and not extent.target.extents:
                    found.append((node, extent.offset, extent.length))
                else:
                    found.append((node, offset, length))
        return found


@dataclass
class RawDiskMapping:
    """The raw disk mapping of one virtual disk: its identifiers and its storage tree."""

    disk: str
    agent: str
    root: StorageNode
    identifiers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON document."""
        return {
            "format": MAPPING_FORMAT,
            "version": MAPPING_VERSION,
            "disk": self.disk,
            "agent": self.agent,
            "identifiers": dict(self.identifiers),
            "storage": self.root.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RawDiskMapping:
        """Parse a mapping document (raises KeyError/TypeError/ValueError when malformed)."""
        if data.get("format") != MAPPING_FORMAT:
            raise ValueError("not a raw disk mapping document")
        try:
            if int(data.get("version", 0)) > MAPPING_VERSION:
                raise ValueError(f"mapping version {data.get('version')} is newer than this tool")
            return cls(
                disk=str(data["disk"]),
                agent=str(data["agent"]),
                root=StorageNode.from_dict(data["storage"]),
                identifiers=dict(data.get("identifiers") or {}),
            )
        except OverflowError as err:  # a JSON number like 1e400 is float infinity
            raise ValueError(f"malformed mapping: {err}") from err


@runtime_checkable
class StorageAgent(Protocol):
    """A storage-side agent that maps raw disks to portions of source storage."""

    name: str

    def can_map(self, disk: RawDisk) -> bool:
        """True when this agent knows the kind of storage behind ``disk``."""
        ...

    def map(self, disk: RawDisk) -> StorageNode:
        """The storage tree behind ``disk`` (raises StorageError when it cannot)."""
        ...
