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
pointer is only stored with the next good superblock.

One writer at a time, whatever address it reaches the export by: a writer first
takes the volume's lease (:mod:`lease`) by writing the next generation, with
its lease, into the older slot; it flushes, waits ``SETTLE`` seconds and reads
both slots back. A writer that read the table before another's claim landed
writes its own within ``CLAIM_WINDOW`` seconds of that read, so one of the two
claims is always the one both read back, and the other fails. The holder
renews the lease while it writes, and publishes only when the newest
generation is still its own (read again right before the new superblock is
written), releasing the lease with the publication.

Everything read from the volume is checked before it is used: a superblock's
header, length, checksum and fields, each listed manifest's place and size, each
layer's region; what fails is damage (:class:`VerificationError`, exit 5).

The damage record holds what ``verify`` or ``restore`` found wrong with stored
layers. Backups never write it and readers never write the superblocks, so a
reader on another host cannot undo a backup being published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import struct
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    RepositoryError,
    VerificationError,
)
from libvirt_rdm_backup.process import stall_timeout
from libvirt_rdm_backup.qemu.layers import option_value
from libvirt_rdm_backup.qemu.nbd_io import NbdError, connect_nbd
from libvirt_rdm_backup.repository.digest import BUFFER, Digest
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST, Manifest, valid_sequence
from libvirt_rdm_backup.repository.order import in_order, next_sequence
from libvirt_rdm_backup.repository.store import Damage, Scan, now_iso
from libvirt_rdm_backup.targets.lease import HELD, Lease
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
MAX_BODY = DAMAGE_OFFSET - _HEAD.size  # the largest table of contents (both slots)
MAX_OFFSET = 1 << 62
MAX_LISTING = 512 << 20  # manifest bytes one listing of a volume reads at most
SETTLE = 1.0  # seconds between writing a lease claim and reading it back
CLAIM_WINDOW = 0.5  # a claim is written at most this long after the table it builds on was read
CLAIM_ATTEMPTS = 4  # reads of the table of contents to take the writer lease on
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")


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
    lease: Lease | None = None  # the writer's, while one writes

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "id": self.volume_id,
               "next_free": self.next_free, "entries": self.entries}
        if self.lease is not None:
            doc["lease"] = self.lease.to_dict()
        body = json.dumps(doc).encode()
        if len(body) > MAX_BODY:
            raise RepositoryError("NBD volume table of contents is full")
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
        return cls(volume_id, generation, next_free, entries, lease)

    @classmethod
    def from_bytes(cls, data: bytes) -> Superblock | None:
        """Parse one slot; None when it holds no valid superblock."""
        try:
            return cls.parse(data)
        except ValueError:
            return None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_sequence(entry: dict[str, Any]) -> int | None:
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

    def allocate(self, length: int) -> int:
        """Reserve a region; it becomes permanent with the next :meth:`publish`.

        A lease holder records the region in its lease before anything is written
        there, so whoever takes a lease over from a stalled or killed holder (whose
        QEMU may still be writing) allocates past it.
        """
        with self._mutex:
            offset = self.next_free
            if offset + length > self.size:
                raise OperationError(f"NBD target {self.address.uri} is full "
                                     f"({self.size} bytes, {offset + length} needed)")
            self.next_free = _align(offset + length)
            if self._lease is not None:
                self.renew_lease()
            return offset

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
        hasher = hashlib.sha256()
        try:
            pos = 0
            while pos < length:
                count = min(BUFFER, length - pos)
                hasher.update(self.handle.pread(count, offset + pos))
                pos += count
        except NbdError as err:
            raise OperationError(f"NBD read of {self.address.uri} failed: {err}") from err
        return Digest("sha256", hasher.hexdigest())

    # -- table of contents -----------------------------------------------------------------

    def _write_superblock(self, superblock: Superblock) -> None:
        slot = 0 if superblock.generation % 2 == 0 else SLOT
        self.write(slot, superblock.to_bytes())
        self.flush()

    def _read_table(self) -> Superblock:
        newest = read_table(self.handle, self.address.uri)
        if newest is None:
            raise VerificationError(f"NBD volume {self.address.uri}: table of contents is gone")
        return newest

    # -- the writer lease ------------------------------------------------------------------

    def take_lease(self) -> None:
        """Become the volume's one writer, or fail (OperationError, exit 4) naming the holder.

        On success the table of contents is the one read back with the lease, and
        a heartbeat renews the lease until :meth:`publish` or :meth:`release_lease`.
        """
        with self._mutex:
            retry.lease_claim(self.address.uri, CLAIM_ATTEMPTS)(self._claim_lease, set())

    def _claim_lease(self, watched: set[tuple[int, str]]) -> None:
        """One attempt of :meth:`take_lease` (``watched``: expired leases already watched).

        Raises :class:`~.retry.Again` to look again: after half the ``ttl`` of an expired
        lease first seen (longer than its renewal interval), or at once after a read that
        was too slow to build a claim on.
        """
        uri = self.address.uri
        began = time.monotonic()
        current = self._read_table()
        held = current.lease
        if held is not None and not held.holder_gone():
            if not held.expired():
                raise OperationError(f"NBD volume {uri} is being written by another "
                                     f"backup ({held.describe()})")
            if (current.generation, held.token) not in watched:
                watched.add((current.generation, held.token))
                raise retry.Again(held.ttl / 2)
        if held is not None:
            log.warning("NBD volume %s: taking over the writer lease of %s: its "
                        "holder is gone", uri, held.describe())
        start = max(current.next_free, held.reserved if held is not None else 0)
        claim = Lease.mine(reserved=start)  # past what a lost holder may still write
        new = replace(current, generation=current.generation + 1, lease=claim)
        if time.monotonic() - began > CLAIM_WINDOW:
            raise retry.Again()  # too slow since the read: read again
        self._write_superblock(new)
        time.sleep(self.settle)  # a deliberate pause: a rival's claim lands meanwhile
        check = self._read_table()
        if check.generation != new.generation or check.lease != claim:
            holder = (check.lease.describe() if check.lease
                      else f"generation {check.generation}")
            raise OperationError(f"NBD volume {uri}: another backup took the writer "
                                 f"lease first ({holder})")
        HELD.add(claim.token)
        self._lease, self.superblock, self.next_free = claim, check, start
        self._start_heartbeat()

    def _held_table(self) -> Superblock:
        """The newest table of contents, which must still be the one of this writer's lease."""
        current = self._read_table()
        if (self._lease is None or current.generation != self.superblock.generation
                or current.lease is None or current.lease.token != self._lease.token):
            other = current.lease.describe() if current.lease else "no lease"
            raise OperationError(f"NBD volume {self.address.uri}: this backup lost its writer "
                                 f"lease (generation {current.generation}, {other}); "
                                 "nothing was published")
        return current

    def renew_lease(self) -> None:
        """Write the next generation with the lease renewed (raises when the lease was lost)."""
        with self._mutex:
            if self._lease is None:
                return
            current = self._held_table()
            lease = self._lease.renew(reserved=self.next_free)
            new = replace(current, generation=current.generation + 1, lease=lease)
            self._write_superblock(new)
            self._lease, self.superblock = lease, new

    def release_lease(self) -> None:
        """Give the lease back if still held (best effort: the holder may be gone already).

        A server that stopped answering holds the heartbeat in its read: after the stall
        limit the lease is left to expire (``ttl``) rather than waited for forever.
        """
        self._stop_heartbeat()
        if not self._mutex.acquire(timeout=stall_timeout()):
            log.info("NBD volume %s does not answer: its writer lease is left to expire",
                        self.address.uri)
            return
        with contextlib.ExitStack() as held:
            held.callback(self._mutex.release)
            if self._lease is None:
                return
            try:
                current = self._held_table()
                self._write_superblock(replace(current, generation=current.generation + 1,
                                               lease=None))
                HELD.discard(self._lease.token)
            except RdmBackupError as err:
                log.info("NBD volume %s: writer lease not released: %s", self.address.uri, err)
                HELD.discard(self._lease.token)
            self._lease = None

    def _start_heartbeat(self) -> None:
        assert self._lease is not None
        stop = self._beat = threading.Event()
        interval = self._lease.ttl / 3

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.renew_lease()
                except RdmBackupError as err:
                    log.info("heartbeat stopped: %s", err)  # the publication reports it
                    return

        threading.Thread(target=beat, name="rdmb-volume-lease", daemon=True).start()

    def _stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beat = None

    def publish(self, manifest: Manifest) -> None:
        """Store the manifest, then a new superblock listing it (the backup now exists).

        The manifest gets the volume's next sequence number (its publish order).
        Takes the writer lease first when not held; fails (OperationError) when the
        lease was lost, checked right before the superblock is written, which also
        releases the lease.
        """
        with self._mutex:
            if self._lease is None:
                self.take_lease()
            manifest.sequence = next_sequence(map(_entry_sequence, self._held_table().entries))
            text = manifest.dumps().encode()
            offset = self.allocate(len(text))
            self.write(offset, text)
            self.flush()  # data and manifest are durable before the table points at them
            entry = {"backup_id": manifest.backup_id, "domain_uuid": manifest.domain_uuid,
                     "manifest": [offset, len(text)], "published": now_iso(),
                     "sequence": manifest.sequence}
            current = self._held_table()
            new = Superblock(current.volume_id, current.generation + 1, self.next_free,
                             [*current.entries, entry])
            self._stop_heartbeat()
            self._write_superblock(new)
            assert self._lease is not None
            HELD.discard(self._lease.token)
            self._lease, self.superblock = None, new

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
            sequence = _entry_sequence(entry)
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
