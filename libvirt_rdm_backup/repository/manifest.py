"""Backup manifests: the only truth about a backup (versioned JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.storage.base import RawDiskMapping

MANIFEST_FORMAT = "libvirt-rdm-backup/manifest"
MANIFEST_VERSION = 1
MAX_MANIFEST = 4 << 20  # bytes read of a manifest at most; a longer one is damaged


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a size in bytes, got {value!r}")
    return value


MAX_SEQUENCE = (1 << 53) - 1  # a backup a second for 285 million years; exact in any JSON reader


def valid_sequence(value: Any) -> TypeGuard[int]:
    """True for a sequence number this tool could have written (1 .. MAX_SEQUENCE)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SEQUENCE


def _optional_sequence(value: Any) -> int | None:
    if value is None:
        return None
    if not valid_sequence(value):
        raise ValueError(f"expected a sequence number, got {value!r}")
    return value


def _optional_dict(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return dict(value)


@dataclass
class DiskRecord:
    """One disk of a backup: identifiers, mapping, and the stored data."""

    disk: RawDisk
    size: int
    data_file: str
    format: str
    digest: Digest
    level: str
    data_path: str  # "qemu" (block job), "storage" (from storage), "snapshot" (storage snapshot)
    bytes_transferred: int
    stored_bytes: int
    mapping: RawDiskMapping | None = None
    mapping_error: str | None = None
    reason: str = ""
    parent: str | None = None  # backup whose data file is this layer's backing file
    backing_file: str | None = None  # relative path, as written in the qcow2 header
    bitmap: str | None = None  # the QEMU dirty bitmap tracking writes since this point
    chunk_map: str | None = None  # file of per-chunk digests of the disk at this point
    chunk_map_digest: Digest | None = None
    storage_snapshot: dict[str, Any] | None = None  # kept for the next incremental
    location: dict[str, Any] | None = None  # NBD volumes: offset, region size, length
    file_size: int | None = None  # file repositories: the data file's length in bytes
    compression: str | None = None  # "zstd" or "zlib": the layer's clusters written compressed
    encryption: dict[str, Any] | None = None  # {"format": "luks", "key_id": ...}: encrypted

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "disk": self.disk.target,
            "identifiers": self.disk.to_dict(),
            "size": self.size,
            "data_file": self.data_file,
            "format": self.format,
            "digest": self.digest.to_dict(),
            "level": self.level,
            "reason": self.reason,
            "data_path": self.data_path,
            "bytes_transferred": self.bytes_transferred,
            "stored_bytes": self.stored_bytes,
            "parent": self.parent,
            "backing_file": self.backing_file,
            "bitmap": self.bitmap,
            "chunk_map": self.chunk_map,
            "storage_snapshot": self.storage_snapshot,
            "location": self.location,
            "file_size": self.file_size,
            "compression": self.compression,
            "encryption": self.encryption,
            "chunk_map_digest": self.chunk_map_digest.to_dict() if self.chunk_map_digest
            else None,
            "mapping": self.mapping.to_dict() if self.mapping else None,
            "mapping_error": self.mapping_error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskRecord:
        """Inverse of :meth:`to_dict`."""
        mapping = data.get("mapping")
        return cls(
            disk=RawDisk.from_dict(data["identifiers"]),
            size=int(data["size"]),
            data_file=str(data["data_file"]),
            format=str(data["format"]),
            digest=Digest.from_dict(data["digest"]),
            level=str(data["level"]),
            reason=str(data.get("reason", "")),
            data_path=str(data["data_path"]),
            bytes_transferred=int(data["bytes_transferred"]),
            stored_bytes=int(data["stored_bytes"]),
            mapping=RawDiskMapping.from_dict(mapping) if mapping else None,
            mapping_error=data.get("mapping_error"),
            parent=_optional_str(data.get("parent")),
            backing_file=_optional_str(data.get("backing_file")),
            bitmap=_optional_str(data.get("bitmap")),
            chunk_map=_optional_str(data.get("chunk_map")),
            storage_snapshot=_optional_dict(data.get("storage_snapshot")),
            location=_optional_dict(data.get("location")),
            file_size=_optional_int(data.get("file_size")),
            compression=_optional_str(data.get("compression")),
            encryption=_optional_dict(data.get("encryption")),
            chunk_map_digest=Digest.from_dict(data["chunk_map_digest"])
            if data.get("chunk_map_digest") else None,
        )


@dataclass
class Manifest:
    """A published backup of one domain at one point in time."""

    backup_id: str
    domain_uuid: str
    domain_name: str
    level: str
    created: str
    completed: str
    consistency: dict[str, Any]
    domain_xml: str
    disks: list[DiskRecord] = field(default_factory=list)
    chain: str = "default"
    parent: str | None = None  # the previous backup of the chain
    reason: str = ""
    sequence: int | None = None  # publish order in the repository (None: written before it)

    def disk(self, target: str) -> DiskRecord | None:
        """The record of disk ``target``, or None."""
        return next((d for d in self.disks if d.disk.target == target), None)

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON document."""
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "backup_id": self.backup_id,
            "sequence": self.sequence,
            "domain_uuid": self.domain_uuid,
            "domain_name": self.domain_name,
            "level": self.level,
            "chain": self.chain,
            "parent": self.parent,
            "reason": self.reason,
            "created": self.created,
            "completed": self.completed,
            "consistency": self.consistency,
            "disks": [d.to_dict() for d in self.disks],
            "domain_xml": self.domain_xml,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest document (raises RepositoryError when malformed)."""
        try:
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise ValueError("not a backup manifest")
            if int(data["version"]) > MANIFEST_VERSION:
                raise ValueError(f"manifest version {data['version']} is newer than this tool")
            return cls(
                backup_id=str(data["backup_id"]),
                sequence=_optional_sequence(data.get("sequence")),
                domain_uuid=str(data["domain_uuid"]),
                domain_name=str(data["domain_name"]),
                level=str(data["level"]),
                chain=str(data.get("chain", "default")),
                parent=_optional_str(data.get("parent")),
                reason=str(data.get("reason", "")),
                created=str(data["created"]),
                completed=str(data["completed"]),
                consistency=dict(data.get("consistency") or {}),
                domain_xml=str(data.get("domain_xml", "")),
                disks=[DiskRecord.from_dict(d) for d in data["disks"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                RecursionError) as err:
            raise RepositoryError(f"malformed manifest: {err}") from err

    def dumps(self) -> str:
        """Serialised form written to disk."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def loads(cls, text: str) -> Manifest:
        """Parse serialised form (raises RepositoryError)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: also a number too long
            raise RepositoryError(f"malformed manifest: {err}") from err
        return cls.from_dict(data)
