"""A store of backups inside an NBD export: an NBD volume (:mod:`stores`)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack, contextmanager
from typing import Any

from libvirt_rdm_backup.engine.merge_plan import PlannedMerge, check_merge_keys
from libvirt_rdm_backup.engine.sinks import NbdSink, Session
from libvirt_rdm_backup.engine.volume_merge import consolidate_volume
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    OperationError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.fslock import exclusive, waiting
from libvirt_rdm_backup.locks import lock_dir
from libvirt_rdm_backup.modes import Compression
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.qemu.secrets import LayerKey, active_secret, key_file, secret_definition
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.rekey_journal import unfinished
from libvirt_rdm_backup.repository.store import Scan
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_changes import SpaceReport
from libvirt_rdm_backup.targets.volume_format import location_problem

log = logging.getLogger("libvirt_rdm_backup.engine.stores")

GATE_TIMEOUT = 600.0  # seconds readers and prunes of this host wait for each other


class VolumeStore:
    """Backups inside an NBD export (:class:`NbdVolume`)."""

    local_layers = False
    resync_layers = True  # takes resync layers (compared with a chunk map or read back)
    storage_layers = True  # a qcow2 layer of the ranges, on the parent when restored
    self_contained = False

    def __init__(self, volume: NbdVolume, key: LayerKey | None = None) -> None:
        self.volume = volume
        self.name = volume.address.uri
        self.repo_id = volume.repo_id
        self.key = key
        self._objects = img.objects(*volume.qemu_img_objects())
        self._keys = ExitStack()
        self._checked: dict[int, bytes] = {}  # region offset -> the header bytes checked
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if key is not None and volume.superblock.rekey is not None:
            volume.close()  # nothing is read with a key while headers change
            raise unfinished(f"volume {self.name}")

    def __enter__(self) -> VolumeStore:
        self._objects.__enter__()  # qemu-img calls of this store get the TLS object
        self._keys.enter_context(self.keys())  # and the key's secret, from a private file
        return self

    @contextmanager
    def keys(self) -> Iterator[None]:
        """Every QEMU started in the block gets the key from a private file (none without
        a key)."""
        if self.key is None:
            yield
            return
        with key_file(self.key) as path, img.objects(secret_definition(path)):
            yield

    def __exit__(self, *exc: object) -> None:
        self._keys.close()
        self._objects.__exit__(None, None, None)
        self.volume.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    @contextmanager
    def reading(self, domain_uuid: str) -> Iterator[None]:
        """No prune or key change of this host changes the regions read meanwhile (one
        from another host is not seen: see docs/retention.md); refused while a key change
        is unfinished, or when one of them changed the domain's backups while this waited
        (what was listed before is not what the volume holds now)."""
        with waiting(self._gate_path(), GATE_TIMEOUT, shared=True):
            newest = self.volume.newest_table()
            if newest.rekey is not None:
                raise unfinished(f"volume {self.name}")
            if self.volume.rewritten(newest, domain_uuid):
                raise OperationError(f"backups of domain {domain_uuid} in volume {self.name} "
                                     "were written again or dropped (by a prune or a key "
                                     "change) since they were listed; run the command again")
            yield

    def gate(self) -> ContextManager[None]:
        """Once this host's readers of the volume are done, none begins until the block
        ends (a prune's or key change's)."""
        return waiting(self._gate_path(), GATE_TIMEOUT)

    def _gate_path(self) -> str:
        return self._lock_path(".prune")

    def _lock_path(self, kind: str) -> str:
        """A lock file of this host for this volume (``kind``: what it guards)."""
        directory = lock_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        key = hashlib.sha256(self.volume.address.uri.encode()).hexdigest()[:16]
        return os.path.join(directory, f"volume-{key}{kind}.lock")

    @contextmanager
    def lock(self, domain_uuid: str) -> Iterator[None]:
        """One writer per volume, from any host: the lease kept in the volume itself."""
        self.volume.take_lease()
        self.repo_id = self.volume.repo_id  # as read back with the lease
        try:
            if self.volume.superblock.rekey is not None:
                raise unfinished(f"volume {self.name}")
            yield
        finally:
            self.volume.release_lease()

    def _lock(self, kind: str, busy: str) -> ContextManager[None]:
        return exclusive(self._lock_path(kind), busy)

    def scan(self, domain_uuid: str | None = None) -> Scan:
        return self.volume.scan(domain_uuid)

    def consolidate(self, domain_uuid: str, chain: Chain, drop: set[str], speed: int = 0
                    ) -> tuple[list[PlannedMerge], int]:
        """Kept layers rewritten into fresh regions, published with the drops in one write
        (:mod:`.volume_merge`); the caller holds :meth:`lock`."""
        check_merge_keys(self.check_key, chain)
        with self.gate():  # readers of this host are done
            return consolidate_volume(self, domain_uuid, chain, drop, speed)

    def publish_changes(self, domain_uuid: str, replace: Sequence[Manifest],
                        drop: Sequence[str]) -> SpaceReport:
        """Drop backups of the domain and replace kept ones' manifests, in one publication.

        The regions no backup owns any more go onto the volume's free list (reused
        by later backups) and are trimmed on the server. A new manifest's layers may
        be in regions allocated (``self.volume.allocate``) and written under the
        writer lease (:meth:`lock`); the lease is released with the publication.
        """
        return self.volume.publish_changes(domain_uuid, replace, drop)

    def new_layers(self, compression: Compression | None) -> LayerFormat:
        """How a new backup's layers are written: encrypted with the key (the volume's key:
        every encrypted record names it, salt beside its key id), else plain or compressed
        (refused where the volume holds encrypted backups)."""
        found = [r.encryption for m in self.scan().backups for r in m.disks if r.encryption]
        if self.key is None:
            if found:
                raise UsageError(f"volume {self.name} holds encrypted backups: give "
                                 "--encrypt-key-file FILE (its backups are all encrypted, "
                                 "with one key)")
            return LayerFormat(compression)
        for encryption in found:
            self._check_encryption(encryption)
        salt = str(found[0]["salt"]) if found else secrets.token_hex(16)
        return LayerFormat(compression, self.key.key_id(bytes.fromhex(salt)), salt)

    def check_key(self, point: DiskPoint) -> None:
        """Refuse (UsageError) to read an encrypted point without its key."""
        if point.record.encryption is None:
            return
        if self.key is None:
            raise UsageError(f"backup {point.backup_id} disk {point.record.disk.target} is "
                             "encrypted: give --encrypt-key-file FILE")
        self._check_encryption(point.record.encryption)

    def _check_encryption(self, encryption: dict[str, Any]) -> None:
        assert self.key is not None
        salt, key_id = encryption.get("salt"), encryption.get("key_id")
        if not isinstance(salt, str) or not re.fullmatch(r"[0-9a-f]{32}", salt) \
                or not secrets.compare_digest(self.key.key_id(bytes.fromhex(salt)),
                                              str(key_id)):
            raise UsageError(f"the key of --encrypt-key-file is not the key of volume "
                             f"{self.name}")

    @contextmanager
    def session(self, domain_uuid: str, backup_id: str,
                layer_format: LayerFormat = PLAIN) -> Iterator[Session]:
        with tempfile.TemporaryDirectory(prefix="rdmb-session-") as scratch:
            yield NbdSink(self.volume, scratch, layer_format, self.key)

    def chunk_map(self, point: DiskPoint) -> ChunkMap | None:
        """None: a volume keeps no chunk maps (its layers are not local files)."""
        return None

    def damage(self, point: DiskPoint, digests: bool = False) -> str | None:
        if digests:
            return self._check(point.manifest, point.record)
        return self._layer_problem(point.manifest, point.record)

    def _check(self, manifest: Manifest, record: DiskRecord) -> str | None:
        """What is wrong with a disk's stored region (its digest).

        A mismatch is recorded in the volume's damage record, for the cheap checks
        of later backups; a match clears such a record.
        """
        location = record.location
        problem = location_problem(location, self.volume.size)
        if problem is not None:
            return f"{record.data_file}: {problem}"
        assert location is not None
        try:
            problem = self._header_problem(record)
            if problem is not None:
                self._mark(manifest, record.disk.target, problem)
                return problem
            digest = self.volume.digest(int(location["offset"]), int(location["length"]))
        except RdmBackupError as err:
            return f"{record.data_file} unreadable: {err}"
        problem = None
        if digest.value != record.digest.value:
            problem = f"{record.data_file}: {digest.algorithm} mismatch"
        self._mark(manifest, record.disk.target, problem)
        return problem

    def _mark(self, manifest: Manifest, disk: str, problem: str | None) -> None:
        """Record or clear a disk's damage in the volume's damage record; best effort."""
        if (self.volume.damage_mark(manifest, disk) is None) == (problem is None):
            return  # nothing to change (a known damage keeps the date it was found)
        try:
            with self._lock(".damage", "another run is recording damage in this volume"):
                recorded = self.volume.set_damage_mark(manifest, disk, problem)
        except RdmBackupError as err:
            recorded, why = False, str(err)
        except OSError as err:
            recorded, why = False, f"no lock: {err.strerror or err}"
        else:
            why = "the export is read-only or its damage record is full"
        if not recorded:
            log.info("cannot record the state of backup %s disk %s in %s: %s",
                     manifest.backup_id, disk, self.name, why)

    def _layer_problem(self, manifest: Manifest, record: DiskRecord) -> str | None:
        """A cheap check that a layer can be built on: recorded damage, a location."""
        mark = self.volume.damage_mark(manifest, record.disk.target)
        if mark is not None:
            return mark
        problem = location_problem(record.location, self.volume.size)
        if problem is not None:
            return f"{record.data_file}: {problem}"
        try:
            return self._header_problem(record)
        except (KeyError, TypeError, ValueError) as err:
            return f"{record.data_file}: malformed location: {err}"
        except RdmBackupError as err:
            return f"{record.data_file} unreadable: {err}"

    def _header_problem(self, record: DiskRecord) -> str | None:
        """What in a layer's header this tool did not write (a region never has a backing
        file: the lower layers are given explicitly)."""
        location = record.location or {}
        offset, length = int(location["offset"]), int(location["length"])
        data = self.volume.read(offset, min(length, layers.HEADER_READ))
        problem = layers.header_problem(data, None, record.size, record.encryption is not None)
        if problem is not None:
            return f"{record.data_file} {problem}"
        self._checked[offset] = data
        return None

    def image_node(self, points: list[DiskPoint]) -> dict[str, Any]:
        """The point's qcow2 regions, each one's backing explicit and its header pinned.

        QEMU reads each layer's header from a local copy of the bytes that were checked
        (:func:`~libvirt_rdm_backup.qemu.layers.pinned_head`), the rest from the export:
        a server cannot show QEMU another header than it showed the check.
        """
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="rdmb-headers-")
        files = []
        for point in points:
            self.check_key(point)
            record = point.record
            problem = location_problem(record.location, self.volume.size)
            if problem is not None:
                raise DamagedBackupError(point.backup_id, f"{record.data_file}: {problem}",
                                         record.disk.target)
            location = record.location or {}
            offset, region = int(location["offset"]), int(location["region"])
            if offset not in self._checked:
                problem = self._header_problem(record)
                if problem is not None:
                    raise DamagedBackupError(point.backup_id, problem, record.disk.target)
            files.append(layers.pinned_head(
                self._checked[offset], self.volume.region_node(offset, region), region,
                os.path.join(self._scratch.name, f"{offset}.qcow2")))
        return layers.chain_node(files, [p.record.encryption is not None for p in points])

    def qemu_objects(self) -> tuple[dict[str, Any], ...]:
        """``object-add`` arguments the nodes of :meth:`image_node` need (TLS credentials)."""
        tls, secret = self.volume.tls_object(), active_secret() if self.key else None
        return tuple(o for o in (tls, secret) if o is not None)

    def holds(self, path: str) -> bool:
        """False: the volume's file is on the backup server, not a local path of this store."""
        return False
