"""A backup repository inside one NBD export: a self-describing volume.

The export (any NBD server; ``rdm-backup receive`` serves one from a sparse
file) is laid out as::

    [0, 960 KiB)          superblock slot A   MAGIC, generation, length, sha256, JSON
    [960 KiB, 1 MiB)      damage record       DMG_MAGIC, 0, length, sha256, JSON
    [1 MiB, 1984 KiB)     superblock slot B   (the valid slot with the higher generation wins)
    [2 MiB, ...)          regions, 1 MiB aligned: qcow2 images of disks, manifest JSON

Each disk of each backup is a qcow2 image in a region of its own, written by the
VM's QEMU through ``raw`` (offset/size) over an ``nbd`` node: no data passes
through this tool. A backup exists once a new superblock generation lists its
manifest; a failed backup's regions are simply reused, because the allocation
pointer is only stored with the next good superblock. One writer at a time.

The damage record holds what ``verify`` or ``restore`` found wrong with stored
layers. Backups never write it and readers never write the superblocks, so a
reader on another host cannot undo a backup being published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

import nbd

from libvirt_rdm_backup.errors import NotFoundError, OperationError, RepositoryError
from libvirt_rdm_backup.qemu.layers import option_value
from libvirt_rdm_backup.repository.digest import BUFFER, Digest
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST, Manifest
from libvirt_rdm_backup.repository.store import Damage, now_iso
from libvirt_rdm_backup.targets.uri import NbdAddress

log = logging.getLogger(__name__)

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
TLS_ID = "rdmb-tls-client"  # the TLS credentials object, in QEMU and in qemu-img


def region_size(disk_size: int) -> int:
    """Room for a qcow2 image of a disk: data, L1/L2 and refcount tables, headroom."""
    return _align(disk_size + disk_size // 512 + 8 * ALIGN)


def _align(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


@dataclass
class Superblock:
    """The volume's table of contents."""

    volume_id: str
    generation: int = 0
    next_free: int = DATA_START
    entries: list[dict[str, Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        body = json.dumps({"format": FORMAT, "version": VERSION, "id": self.volume_id,
                           "next_free": self.next_free, "entries": self.entries}).encode()
        if _HEAD.size + len(body) > DAMAGE_OFFSET:
            raise RepositoryError("NBD volume table of contents is full")
        return _HEAD.pack(MAGIC, self.generation, len(body), hashlib.sha256(body).digest()) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> Superblock | None:
        """Parse one slot; None when it holds no valid superblock."""
        if len(data) < _HEAD.size:
            return None
        magic, generation, length, digest = _HEAD.unpack_from(data)
        if magic != MAGIC or length > SLOT - _HEAD.size:
            return None
        body = data[_HEAD.size:_HEAD.size + length]
        if hashlib.sha256(body).digest() != digest:
            return None
        try:
            doc = json.loads(body)
            if doc.get("format") != FORMAT or int(doc.get("version", 0)) > VERSION:
                return None
            return cls(str(doc["id"]), generation, int(doc["next_free"]),
                       list(doc["entries"]))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            return None


def newest_superblock(slot_a: bytes, slot_b: bytes) -> Superblock | None:
    """The valid one of the two slots with the higher generation, or None."""
    valid = [s for s in map(Superblock.from_bytes, (slot_a, slot_b)) if s is not None]
    return max(valid, key=lambda s: s.generation) if valid else None


def damage_from_bytes(data: bytes) -> dict[str, dict[str, str]]:
    """A damage record as ``{backup id: {disk: problem}}`` ({} when absent or corrupt)."""
    magic, _generation, length, digest = _HEAD.unpack_from(data)
    body = data[_HEAD.size:_HEAD.size + length]
    if magic != DAMAGE_MAGIC or hashlib.sha256(body).digest() != digest:
        return {}
    try:
        doc = json.loads(body)
        return {str(k): {str(d): str(p) for d, p in v.items()} for k, v in doc.items()}
    except (ValueError, AttributeError, RecursionError):
        return {}


class NbdVolume:
    """A backup repository kept inside an NBD export."""

    def __init__(self, address: NbdAddress, handle: Any, superblock: Superblock,
                 size: int, tls_dir: str | None = None) -> None:
        self.address = address
        self.tls_dir = tls_dir
        self.handle = handle
        self.superblock = superblock
        self.size = size
        self.next_free = superblock.next_free
        self._damage: dict[str, dict[str, str]] | None = None  # read on first use

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, address: NbdAddress, create: bool = False,
             tls_dir: str | None = None) -> NbdVolume:
        """Connect and read the table of contents (``create``: format an empty export)."""
        handle = nbd.NBD()
        try:
            if tls_dir is not None:
                handle.set_tls(nbd.TLS_REQUIRE)
                handle.set_tls_certificates(tls_dir)
            handle.connect_uri(address.uri)
            size = int(handle.get_size())
            newest = newest_superblock(*(bytes(handle.pread(SLOT, offset))
                                         for offset in (0, SLOT)))
        except nbd.Error as err:
            raise OperationError(f"cannot open NBD target {address.uri}: {err}") from err
        if newest is not None:
            return cls(address, handle, newest, size, tls_dir)
        if not create:
            handle.shutdown()
            raise NotFoundError(f"NBD target {address.uri} holds no backup volume")
        if any(bytes(handle.pread(4096, offset)) != bytes(4096) for offset in (0, SLOT)):
            handle.shutdown()
            raise RepositoryError(f"NBD target {address.uri} holds other data; refusing to "
                                  "format it")
        volume = cls(address, handle, Superblock(uuidlib.uuid4().hex[:6]), size, tls_dir)
        volume._write_superblock(volume.superblock)
        return volume

    @property
    def repo_id(self) -> str:
        """Short id of the volume (part of dirty-bitmap names, like a file repository's)."""
        return self.superblock.volume_id

    def close(self) -> None:
        """Disconnect."""
        try:
            self.handle.shutdown()
        except nbd.Error:
            pass

    # -- regions -------------------------------------------------------------------------

    def allocate(self, length: int) -> int:
        """Reserve a region; it becomes permanent with the next :meth:`publish`."""
        offset = self.next_free
        if offset + length > self.size:
            raise OperationError(f"NBD target {self.address.uri} is full "
                                 f"({self.size} bytes, {offset + length} needed)")
        self.next_free = _align(offset + length)
        return offset

    def write(self, offset: int, data: bytes) -> None:
        """Write bytes at ``offset`` (small metadata only)."""
        try:
            self.handle.pwrite(data, offset)
        except nbd.Error as err:
            raise OperationError(f"NBD write to {self.address.uri} failed: {err}") from err

    def flush(self) -> None:
        """Make written data durable on the server."""
        try:
            self.handle.flush()
        except nbd.Error as err:
            raise OperationError(f"NBD flush of {self.address.uri} failed: {err}") from err

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (small metadata only; bounds checked)."""
        if offset < DATA_START or length < 0 or offset + length > self.size:
            raise RepositoryError(f"bytes {offset}..{offset + length} lie outside the data "
                                  f"area of {self.address.uri}")
        try:
            return bytes(self.handle.pread(length, offset))
        except nbd.Error as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err

    def digest(self, offset: int, length: int) -> Digest:
        """sha256 of a region's first ``length`` bytes, read in large requests."""
        hasher = hashlib.sha256()
        try:
            pos = 0
            while pos < length:
                count = min(BUFFER, length - pos)
                hasher.update(self.handle.pread(count, offset + pos))
                pos += count
        except nbd.Error as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
        return Digest("sha256", hasher.hexdigest())

    # -- table of contents -----------------------------------------------------------------

    def _write_superblock(self, superblock: Superblock) -> None:
        slot = 0 if superblock.generation % 2 == 0 else SLOT
        self.write(slot, superblock.to_bytes())
        self.flush()

    def publish(self, manifest: Manifest) -> None:
        """Store the manifest, then a new superblock listing it (the backup now exists)."""
        text = manifest.dumps().encode()
        offset = self.allocate(len(text))
        self.write(offset, text)
        self.flush()  # data and manifest are durable before the table points at them
        entry = {"backup_id": manifest.backup_id, "domain_uuid": manifest.domain_uuid,
                 "manifest": [offset, len(text)], "published": now_iso()}
        new = Superblock(self.superblock.volume_id, self.superblock.generation + 1,
                         self.next_free, [*self.superblock.entries, entry])
        self._write_superblock(new)
        self.superblock = new

    def scan(self, domain_uuid: str | None = None) -> tuple[list[Manifest], list[Damage]]:
        """Published backups, oldest first, and apart those whose manifest is malformed.

        Raises OperationError when the server fails a read.
        """
        found: list[Manifest] = []
        damaged: list[Damage] = []
        for entry in self.superblock.entries:
            uuid, backup_id = str(entry.get("domain_uuid")), str(entry.get("backup_id"))
            if domain_uuid is not None and uuid != domain_uuid:
                continue
            offset, length = entry["manifest"]
            if not 0 < int(length) <= MAX_MANIFEST:
                damaged.append(Damage(uuid, backup_id, f"manifest of {length} bytes"))
                continue
            try:
                raw = bytes(self.handle.pread(int(length), int(offset)))
            except nbd.Error as err:
                raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
            try:
                manifest = Manifest.loads(raw.decode())
                if (manifest.backup_id, manifest.domain_uuid) != (backup_id, uuid):
                    raise RepositoryError(f"manifest names backup {manifest.backup_id} of "
                                          f"{manifest.domain_uuid}")
            except UnicodeDecodeError as err:
                damaged.append(Damage(uuid, backup_id, f"manifest is not UTF-8: {err.reason}"))
            except RepositoryError as err:
                damaged.append(Damage(uuid, backup_id, str(err)))
            else:
                found.append(manifest)
        found.sort(key=lambda m: (m.created, m.backup_id))
        return found, damaged

    # -- damage found by verify or restore ---------------------------------------------------

    def damage_mark(self, backup_id: str, disk: str) -> str | None:
        """What an earlier verify or restore found wrong with a disk's region, or None."""
        if self._damage is None:
            self._damage = self._read_damage()
        return self._damage.get(backup_id, {}).get(disk)

    def set_damage_mark(self, backup_id: str, disk: str, problem: str | None) -> bool:
        """Record (``problem``) or clear (None) a disk's damage in the damage record.

        Read again and rewritten whole; entries of backups no longer listed are
        dropped. False when it cannot be written (read-only export, no room).
        """
        try:
            if self.handle.is_read_only():
                return False
            head = _HEAD.unpack_from(bytes(self.handle.pread(_HEAD.size, 0)))
        except nbd.Error as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
        if head[0] == MAGIC and _HEAD.size + head[2] > DAMAGE_OFFSET:
            return False  # a table of contents written before the record had its place
        damage = self._read_damage()
        marks = {k: v for k, v in damage.get(backup_id, {}).items() if k != disk}
        if problem is not None:
            marks[disk] = f"{problem} (found {now_iso()})"
        damage[backup_id] = marks
        listed = {str(e.get("backup_id")) for e in self.superblock.entries}
        damage = {k: v for k, v in damage.items() if v and k in listed}
        body = json.dumps(damage).encode()
        if _HEAD.size + len(body) > DAMAGE_AREA:
            return False
        data = _HEAD.pack(DAMAGE_MAGIC, 0, len(body), hashlib.sha256(body).digest()) + body
        self.write(DAMAGE_OFFSET, data + bytes(DAMAGE_AREA - len(data)))
        self.flush()
        self._damage = damage
        return True

    def _read_damage(self) -> dict[str, dict[str, str]]:
        """The volume's damage record (see :func:`damage_from_bytes`)."""
        try:
            return damage_from_bytes(bytes(self.handle.pread(DAMAGE_AREA, DAMAGE_OFFSET)))
        except nbd.Error as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err

    # -- QEMU views of regions -------------------------------------------------------------

    def nbd_node(self) -> dict[str, Any]:
        """Blockdev options of the export itself."""
        node: dict[str, Any] = {"driver": "nbd", "server": self.address.qemu_server(),
                                "export": self.address.export}
        if self.tls_dir is not None:
            node["tls-creds"] = TLS_ID
        return node

    def tls_object(self) -> dict[str, Any] | None:
        """QMP ``object-add`` arguments of the client TLS credentials (None without TLS)."""
        if self.tls_dir is None:
            return None
        return {"qom-type": "tls-creds-x509", "id": TLS_ID, "dir": self.tls_dir,
                "endpoint": "client", "verify-peer": True}

    def qemu_img_objects(self) -> tuple[str, ...]:
        """``--object`` definitions qemu-img needs to open this volume's nodes."""
        if self.tls_dir is None:
            return ()
        return (f"tls-creds-x509,id={TLS_ID},endpoint=client,dir={option_value(self.tls_dir)}",)

    def region_node(self, offset: int, size: int) -> dict[str, Any]:
        """Blockdev options of a region of the export (the protocol node of a layer)."""
        return {"driver": "raw", "offset": offset, "size": size, "file": self.nbd_node()}
