"""The on-volume format of an NBD backup volume: layout, superblock, checks.

The export is laid out as::

    [0, 960 KiB)          superblock slot A   MAGIC, generation, length, sha256, JSON
    [960 KiB, 1 MiB)      damage record       DMG_MAGIC, 0, length, sha256, JSON
    [1 MiB, 1984 KiB)     superblock slot B   (the valid slot with the higher generation wins)
    [2 MiB, ...)          regions, 1 MiB aligned: qcow2 images of disks, manifest JSON;
                          free regions (the table's free list, :mod:`volume_space`)

Everything read from the volume is checked here before it is used: a
superblock's header, length, checksum and fields (the free list's shape), each
listed manifest's place and size, each layer's region (see :mod:`nbd_volume`
for the volume itself; :mod:`volume_space` checks the free list against the
regions the entries own).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from libvirt_rdm_backup.errors import OperationError, RepositoryError, VerificationError
from libvirt_rdm_backup.qemu.nbd_io import NbdError
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST, valid_sequence
from libvirt_rdm_backup.targets.lease import Lease

MAGIC = b"RDMBVOL1"
SLOT = 1 << 20
DATA_START = 2 * SLOT
ALIGN = 1 << 20
FORMAT = "libvirt-rdm-backup/nbd-volume"
VERSION = 1
_HEAD = struct.Struct(">8sQQ32s")
DAMAGE_AREA = 64 << 10
DAMAGE_OFFSET = SLOT - DAMAGE_AREA  # in slot A, past the largest superblock
DAMAGE_MAGIC = b"RDMBDMG1"
MAX_BODY = DAMAGE_OFFSET - _HEAD.size  # the largest table of contents (both slots)
MAX_OFFSET = 1 << 62
MAX_REGIONS = 1 << 15  # free regions, and regions of one entry, a table may list
MAX_JOURNAL = 16 << 20  # bytes of the journal of a key change a table may point at
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")

Region = tuple[int, int]  # (offset, length) in the data area, both 1 MiB aligned


def region_size(disk_size: int) -> int:
    """Room for a qcow2 image of a disk: data, L1/L2 and refcount tables, headroom."""
    return align(disk_size + disk_size // 512 + 8 * ALIGN)


def align(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


@dataclass
class Superblock:
    """The volume's table of contents."""

    volume_id: str
    generation: int = 0
    next_free: int = DATA_START
    entries: list[dict[str, Any]] = field(default_factory=list)
    lease: Lease | None = None  # the writer's, while one writes
    free: list[Region] = field(default_factory=list)  # sorted, coalesced, below next_free
    rekey: Region | None = None  # (offset, length) of an unfinished key change's journal

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "id": self.volume_id,
                               "next_free": self.next_free, "entries": self.entries,
                               "free": [list(region) for region in self.free]}
        if self.lease is not None:
            doc["lease"] = self.lease.to_dict()
        if self.rekey is not None:
            doc["rekey"] = list(self.rekey)
        body = json.dumps(doc, separators=(",", ":")).encode()
        if len(body) > MAX_BODY:
            raise RepositoryError(f"NBD volume table of contents is full ({len(self.entries)} "
                                  f"backups need {len(body)} bytes, at most {MAX_BODY}); "
                                  "drop backups to make room")
        return _HEAD.pack(MAGIC, self.generation, len(body), hashlib.sha256(body).digest()) + body

    @classmethod
    def parse(cls, data: bytes) -> Superblock | None:
        """Parse one slot: None when it holds no superblock, ValueError when it is damaged."""
        if len(data) < _HEAD.size:
            return None
        magic, generation, length, digest = _HEAD.unpack_from(data)
        if magic != MAGIC:
            return None
        if length > SLOT - _HEAD.size or _HEAD.size + length > len(data):
            raise ValueError(f"table of contents of {length} bytes does not fit its slot")
        if generation >= 1 << 63:
            raise ValueError(f"generation {generation} out of range")
        body = data[_HEAD.size:_HEAD.size + length]
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("checksum mismatch")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as err:
            raise ValueError("table of contents is not JSON") from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a volume's table of contents")
        version, volume_id = doc.get("version"), doc.get("id")
        next_free, entries = doc.get("next_free"), doc.get("entries")
        if not _is_int(version) or not 0 < version <= VERSION:
            raise ValueError(f"unknown version {version!r}")
        if not isinstance(volume_id, str) or not _ID_RE.fullmatch(volume_id):
            raise ValueError("malformed volume id")
        if (not _is_int(next_free) or not DATA_START <= next_free < MAX_OFFSET
                or next_free % ALIGN):
            raise ValueError(f"allocation pointer {next_free!r} out of range")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("malformed list of backups")
        lease = Lease.from_dict(doc["lease"]) if doc.get("lease") is not None else None
        return cls(volume_id, generation, next_free, entries, lease, _free_list(doc.get("free")),
                   _journal_place(doc.get("rekey"), next_free))

    @classmethod
    def from_bytes(cls, data: bytes) -> Superblock | None:
        """Parse one slot; None when it holds no valid superblock."""
        try:
            return cls.parse(data)
        except ValueError:
            return None


def _free_list(value: Any) -> list[Region]:
    """A stored free list's shape (absent: empty); :mod:`volume_space` checks the rest."""
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) > MAX_REGIONS
            or not all(isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1])
                       for r in value)):
        raise ValueError("malformed free list")
    return [(r[0], r[1]) for r in value]


def _journal_place(value: Any, next_free: int) -> Region | None:
    """A stored journal place (absent: None): ``[offset, length]``, 1 MiB aligned, in the
    data area below the allocation pointer, at most MAX_JOURNAL bytes long."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(map(_is_int, value)):
        raise ValueError("malformed rekey journal place")
    offset, length = value
    if (offset < DATA_START or offset % ALIGN or not 0 < length <= MAX_JOURNAL
            or offset + align(length) > next_free):
        raise ValueError(f"rekey journal place {offset}+{length} is outside the regions")
    return offset, length


def journal_region(table: Superblock) -> list[Region]:
    """The region a table's journal of a key change owns ([] without one)."""
    if table.rekey is None:
        return []
    return [(table.rekey[0], align(table.rekey[1]))]


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def entry_sequence(entry: dict[str, Any]) -> int | None:
    """The sequence a table of contents entry records (None: written before sequences)."""
    value = entry.get("sequence") if isinstance(entry, dict) else None
    return value if valid_sequence(value) else None


def read_table(handle: Any, uri: str) -> Superblock | None:
    """The newest valid superblock of an export; None when neither slot holds one.

    Raises VerificationError when no slot is valid but one is damaged, and
    OperationError when the server fails a read.
    """
    found: list[Superblock] = []
    problems: list[str] = []
    for name, offset in (("A", 0), ("B", SLOT)):
        try:
            data = bytes(handle.pread(_HEAD.size, offset))
            magic, _generation, length, _digest = _HEAD.unpack_from(data)
            if magic == MAGIC and length <= SLOT - _HEAD.size:  # the body only, never more
                data += bytes(handle.pread(length, offset + _HEAD.size)) if length else b""
            block = Superblock.parse(data)
        except NbdError as err:
            raise OperationError(f"NBD read of {uri} failed: {err}") from err
        except ValueError as err:
            problems.append(f"slot {name}: {err}")
            continue
        if block is not None:
            found.append(block)
    if found:
        return max(found, key=lambda s: s.generation)
    if problems:
        raise VerificationError(f"NBD volume {uri}: table of contents is damaged "
                                f"({'; '.join(problems)})")
    return None


def entry_problem(entry: dict[str, Any], size: int) -> str | None:
    """What is wrong with a table-of-contents entry read from a volume of ``size`` bytes."""
    place = entry.get("manifest")
    if not isinstance(entry.get("backup_id"), str) or not isinstance(entry.get("domain_uuid"),
                                                                      str):
        return "malformed table of contents entry"
    offset, length = place if isinstance(place, list) and len(place) == 2 else (None, None)
    if (not _is_int(offset) or not _is_int(length) or not DATA_START <= offset <= size
            or not 0 < length <= MAX_MANIFEST or offset + length > size):
        return f"manifest place {place!r} is outside the volume or too large"
    return None


def location_problem(location: Any, size: int) -> str | None:
    """What is wrong with a layer's ``location`` in a volume of ``size`` bytes (None: fine)."""
    if not isinstance(location, dict):
        return "no location in the volume"
    offset, region, length = (location.get(k) for k in ("offset", "region", "length"))
    if not _is_int(offset) or not _is_int(region) or not _is_int(length):
        return "malformed location"
    if (offset < DATA_START or offset % ALIGN or region <= 0 or offset + region > size
            or not 0 <= length <= region):
        return f"location {offset}+{region} (used {length}) is outside the volume"
    return None


def damage_from_bytes(data: bytes) -> dict[str, dict[str, str]]:
    """A damage record as ``{backup id: {disk: problem}}`` ({} when absent or corrupt)."""
    if len(data) < _HEAD.size:
        return {}
    magic, _generation, length, digest = _HEAD.unpack_from(data)
    if magic != DAMAGE_MAGIC or _HEAD.size + length > min(len(data), DAMAGE_AREA):
        return {}
    body = data[_HEAD.size:_HEAD.size + length]
    if hashlib.sha256(body).digest() != digest:
        return {}
    try:
        doc = json.loads(body)
        return {str(k): {str(d): str(p) for d, p in v.items()} for k, v in doc.items()}
    except (ValueError, AttributeError, RecursionError):
        return {}

