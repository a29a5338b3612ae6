"""A backup repository inside one NBD export: a self-describing volume.

The export (any NBD server; ``rdm-backup receive`` serves one from a sparse
file) holds two superblock slots, a damage record and regions
(:mod:`volume_format`). Each disk of each backup is a qcow2 image in a region of
its own, written by the VM's QEMU through ``raw`` (offset/size) over an ``nbd``
node: no data passes through this tool. A backup exists once a new superblock
generation lists its manifest; a failed backup's regions are simply reused,
because the allocation pointer and the free list are only stored with the next
good superblock. Dropped backups give their regions back (:mod:`volume_changes`).

One writer at a time, whatever address it reaches the export by: it holds the
volume's writer lease (:mod:`volume_lease`) from its first region to the
publication of its manifest.

Everything read from the volume is checked before it is used; what fails is
damage (:class:`VerificationError`, exit 5).

The damage record holds what ``verify`` or ``restore`` found wrong with stored
layers. Backups never write it and readers never write the superblocks, so a
reader on another host cannot undo a backup being published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import uuid as uuidlib
from typing import Any

from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    RepositoryError,
)
from libvirt_rdm_backup.process import stall_timeout
from libvirt_rdm_backup.qemu.layers import option_value
from libvirt_rdm_backup.qemu.nbd_io import NbdError, connect_nbd
from libvirt_rdm_backup.repository.digest import BUFFER, Digest
from libvirt_rdm_backup.repository.ids import now_iso
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.order import in_order
from libvirt_rdm_backup.repository.store import Damage, Scan
from libvirt_rdm_backup.targets.lease import Lease
from libvirt_rdm_backup.targets.uri import NbdAddress
from libvirt_rdm_backup.targets.volume_format import (
    _HEAD,
    DAMAGE_AREA,
    DAMAGE_MAGIC,
    DAMAGE_OFFSET,
    DATA_START,
    MAGIC,
    SLOT,
    Region,
    Superblock,
    damage_from_bytes,
    entry_problem,
    entry_sequence,
    read_table,
)
from libvirt_rdm_backup.targets.volume_journal import VolumeJournal
from libvirt_rdm_backup.targets.volume_lease import SETTLE

log = logging.getLogger(__name__)

TLS_ID = "rdmb-tls-client"  # the TLS credentials object, in QEMU and in qemu-img
MAX_LISTING = 512 << 20  # manifest bytes one listing of a volume reads at most


class NbdVolume(VolumeJournal):
    """A backup repository kept inside an NBD export."""

    def __init__(self, address: NbdAddress, handle: Any, superblock: Superblock,
                 size: int, tls_dir: str | None = None) -> None:
        self.address = address
        self.tls_dir = tls_dir
        self.handle = handle
        self.superblock = superblock
        self.size = size
        self.next_free = superblock.next_free
        self._free, self._taken, self._allocated = list(superblock.free), [], []
        self._damage: dict[str, dict[str, str]] | None = None  # read on first use
        self.settle = SETTLE
        self._lease: Lease | None = None  # held by this writer
        self._mutex = threading.RLock()  # the table of contents: writer and heartbeat
        self._beat: threading.Event | None = None

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, address: NbdAddress, create: bool = False,
             tls_dir: str | None = None) -> NbdVolume:
        """Connect and read the table of contents (``create``: format an empty export)."""
        try:
            handle = connect_nbd(address.uri, tls_dir=tls_dir)
            size = int(handle.get_size())
        except NbdError as err:
            raise OperationError(f"cannot open NBD target {address.uri}: {err}") from err
        try:
            newest = read_table(handle, address.uri)
        except RdmBackupError:
            handle.shutdown()
            raise
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
        """Release the lease if still held, and disconnect; a server that does not answer
        is given up after the stall limit (the connection goes with the process)."""
        self.release_lease()

        def disconnect() -> None:
            with contextlib.suppress(NbdError):
                self.handle.shutdown()

        worker = threading.Thread(target=disconnect, name="rdmb-volume-close", daemon=True)
        worker.start()
        worker.join(stall_timeout())

    # -- regions -------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """Write bytes at ``offset`` (small metadata only)."""
        try:
            self.handle.pwrite(data, offset)
        except NbdError as err:
            raise OperationError(f"NBD write to {self.address.uri} failed: {err}") from err

    def flush(self) -> None:
        """Make written data durable on the server."""
        try:
            self.handle.flush()
        except NbdError as err:
            raise OperationError(f"NBD flush of {self.address.uri} failed: {err}") from err

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (small metadata only; bounds checked)."""
        if offset < DATA_START or length < 0 or offset + length > self.size:
            raise RepositoryError(f"bytes {offset}..{offset + length} lie outside the data "
                                  f"area of {self.address.uri}")
        try:
            return bytes(self.handle.pread(length, offset))
        except NbdError as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err

    def digest(self, offset: int, length: int) -> Digest:
        """sha256 of a region's first ``length`` bytes, read in large requests."""
        return self.digests(offset, length, (0, 0))[0]

    def digests(self, offset: int, length: int, skip: Region) -> tuple[Digest, Digest]:
        """sha256 of a region's first ``length`` bytes, and of those outside ``skip``
        (offset, length within the region), in one read of large requests."""
        whole, outside = hashlib.sha256(), hashlib.sha256()
        start, end = skip[0], skip[0] + skip[1]
        try:
            pos = 0
            while pos < length:
                count = min(BUFFER, length - pos)
                block = memoryview(self.handle.pread(count, offset + pos))
                whole.update(block)
                low, high = max(start - pos, 0), min(end - pos, count)
                outside.update(block if low >= high else block[:low])
                if low < high:
                    outside.update(block[high:])
                pos += count
        except NbdError as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
        return Digest("sha256", whole.hexdigest()), Digest("sha256", outside.hexdigest())

    def scan(self, domain_uuid: str | None = None) -> Scan:
        """Published backups, oldest first, and apart those whose manifest is malformed.

        Raises OperationError when the server fails a read.
        """
        found: list[Manifest] = []
        damaged: list[Damage] = []
        budget = MAX_LISTING
        for entry in self.superblock.entries:
            uuid, backup_id = str(entry.get("domain_uuid")), str(entry.get("backup_id"))
            if domain_uuid is not None and uuid != domain_uuid:
                continue
            problem = entry_problem(entry, self.size)
            if problem is not None:
                damaged.append(Damage(uuid, backup_id, problem))
                continue
            offset, length = entry["manifest"]
            budget -= int(length)
            if budget < 0:
                damaged.append(Damage(uuid, backup_id, "beyond the manifest bytes one listing "
                                      f"reads ({MAX_LISTING >> 20} MiB)"))
                continue
            try:
                raw = bytes(self.handle.pread(int(length), int(offset)))
            except NbdError as err:
                raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
            sequence = entry_sequence(entry)
            try:
                manifest = Manifest.loads(raw.decode())
                if (manifest.backup_id, manifest.domain_uuid) != (backup_id, uuid):
                    raise RepositoryError(f"manifest names backup {manifest.backup_id} of "
                                          f"{manifest.domain_uuid}")
                if manifest.sequence != sequence:
                    raise RepositoryError(f"manifest has sequence {manifest.sequence}, the "
                                          f"table of contents {sequence}")
            except UnicodeDecodeError as err:
                damaged.append(Damage(uuid, backup_id, f"manifest is not UTF-8: {err.reason}",
                                      sequence))
            except RepositoryError as err:
                damaged.append(Damage(uuid, backup_id, str(err), sequence))
            else:
                found.append(manifest)
        return Scan(in_order(found), damaged)

    # -- damage found by verify or restore ---------------------------------------------------

    def damage_mark(self, manifest: Manifest, disk: str) -> str | None:
        """What an earlier verify or restore found wrong with a disk's region, or None."""
        if self._damage is None:
            self._damage = self._read_damage()
        return self._damage.get(manifest.backup_id, {}).get(disk)

    def set_damage_mark(self, manifest: Manifest, disk: str, problem: str | None) -> bool:
        """Record (``problem``) or clear (None) a disk's damage in the damage record.

        Read again and rewritten whole; entries of backups no longer listed are
        dropped. False when it cannot be written (read-only export, no room).
        """
        try:
            if self.handle.is_read_only():
                return False
            head = _HEAD.unpack_from(bytes(self.handle.pread(_HEAD.size, 0)))
        except NbdError as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
        if head[0] == MAGIC and _HEAD.size + head[2] > DAMAGE_OFFSET:
            return False  # a table of contents written before the record had its place
        damage = self._read_damage()
        backup_id = manifest.backup_id
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
        except NbdError as err:
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
