"""Where backups are kept: a file repository or an NBD volume, behind one small interface.

A store lists its backups and the damaged ones (:meth:`Store.scan`), opens the
session a new backup is written through (its own kind of sink, which publishes
the manifest), tells what is wrong with a stored layer (:meth:`Store.damage`),
and gives QEMU a point's layers (:meth:`Store.image_node`). Chosen by the
target's form: a directory, or an ``nbd://`` URI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import Any, Protocol

from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.sinks import DATA_FORMAT, FileSink, NbdSink, Session
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.locks import lock_dir
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.repository.chain import DiskPoint, lineage
from libvirt_rdm_backup.repository.chunkmap import ChunkMap
from libvirt_rdm_backup.repository.digest import Digest, file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import (
    Repository,
    Scan,
    check_backup_id,
    check_safe_name,
)
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume, location_problem
from libvirt_rdm_backup.targets.uri import NbdAddress, parse_target

log = logging.getLogger(__name__)


class Store(Protocol):
    """A place that keeps backups."""

    name: str  # the directory or the URI, for messages
    repo_id: str  # short id, part of the names of QEMU bitmaps of this store
    local_layers: bool  # layers are local files (resyncs and chunk maps need that)

    def __enter__(self) -> Store: ...

    def __exit__(self, *exc: object) -> None: ...

    def lock(self, domain_uuid: str) -> ContextManager[None]:
        """Be the one writer of the domain's backups (fails at once when taken)."""
        ...

    def scan(self, domain_uuid: str | None = None) -> Scan:
        """Readable backups (of all domains, or of one), oldest first, and damaged ones."""
        ...

    def session(self, domain_uuid: str, backup_id: str) -> ContextManager[Session]:
        """Where a new backup is written; nothing of it is visible until it is published."""
        ...

    def chunk_map(self, point: DiskPoint) -> ChunkMap | None:
        """The chunk map kept of a point (None: none kept; raises RdmBackupError)."""
        ...

    def damage(self, point: DiskPoint, digests: bool = False) -> str | None:
        """What is wrong with a point's stored layer, or None.

        Cheap by default (recorded damage, presence, size, header: can it be built
        on); with ``digests`` the stored data is read and compared with its digests,
        and the verdict recorded for later cheap checks.
        """
        ...

    def image_node(self, points: list[DiskPoint]) -> dict[str, Any]:
        """Blockdev options of a point's layers (itself first), each backing explicit."""
        ...

    def qemu_objects(self) -> tuple[dict[str, Any], ...]:
        """``object-add`` arguments the nodes of :meth:`image_node` need (TLS credentials)."""
        ...

    def holds(self, path: str) -> bool:
        """True when writing the local ``path`` would write into the store."""
        ...


def open_store(target: str, create: bool = False, allow_plain_nbd: bool = True,
               tls_dir: str | None = None) -> Store:
    """The store named by ``target`` (a directory or an NBD URI).

    ``nbds://`` targets need ``tls_dir``: a directory with ``ca-cert.pem``,
    ``client-cert.pem`` and ``client-key.pem`` (QEMU's and libnbd's names).
    """
    parsed = parse_target(target, allow_remote_plain=allow_plain_nbd)
    if isinstance(parsed, NbdAddress):
        if parsed.tls and tls_dir is None:
            raise UsageError(f"{target} is TLS: give --tls-creds DIR")
        if tls_dir is not None and not parsed.tls:
            raise UsageError(f"--tls-creds needs an nbds:// target, not {target}")
        return VolumeStore(NbdVolume.open(parsed, create=create, tls_dir=tls_dir))
    if tls_dir is not None:
        raise UsageError("--tls-creds applies to nbds:// targets only")
    return FileStore(Repository.open(parsed, create=create))


class FileStore:
    """Backups as directories of qcow2 files (:class:`Repository`)."""

    local_layers = True

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.name = repo.root
        self.repo_id = repo.repo_id

    def __enter__(self) -> FileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def lock(self, domain_uuid: str) -> ContextManager[None]:
        return self.repo.lock(domain_uuid)

    def scan(self, domain_uuid: str | None = None) -> Scan:
        return self.repo.scan(domain_uuid)

    @contextmanager
    def session(self, domain_uuid: str, backup_id: str) -> Iterator[Session]:
        with self.repo.staging(domain_uuid, backup_id) as staging:
            yield FileSink(self.repo, staging, self._lower_paths)

    def _lower_paths(self, plan: DiskPlan) -> list[str]:
        """The layers a new layer builds on, top first, from the manifests' parent links."""
        if plan.parent is None:
            return []
        point = plan.parent
        points, missing = lineage(self.scan(point.manifest.domain_uuid).backups,
                                  point.manifest, point.record.disk.target)
        if missing is not None:
            raise DamagedBackupError(point.backup_id, f"builds on backup {missing}, which is "
                                     "missing or damaged", point.record.disk.target)
        for lower in points:  # QEMU may read them: only layers this tool wrote
            problem = self.header_problem(lower.manifest, lower.record)
            if problem is not None:
                raise DamagedBackupError(lower.backup_id, problem, lower.record.disk.target)
        return self._layer_paths(points)

    def chunk_map(self, point: DiskPoint) -> ChunkMap | None:
        if point.record.chunk_map is None:
            return None
        directory = self.repo.backup_dir(point.manifest.domain_uuid, point.backup_id)
        path = os.path.join(directory, check_safe_name(point.record.chunk_map, "chunk map"))
        return ChunkMap.load(path, point.record.size)

    def damage(self, point: DiskPoint, digests: bool = False) -> str | None:
        if digests:
            return self._check(point.manifest, point.record)
        return self._layer_problem(point.manifest, point.record)

    def _check(self, manifest: Manifest, record: DiskRecord) -> str | None:
        """What is wrong with a disk's stored data (digests of data file and chunk map).

        A mismatch is recorded beside the data, for the cheap checks of later
        backups; a match clears such a record (the data was repaired). The layer's
        header is checked first (:meth:`header_problem`).
        """
        path = self.repo.data_file(manifest, record)
        problem, lasting = self.header_problem(manifest, record), True
        if problem is None:
            problem, lasting = _file_problem(path, record.data_file, record.digest)
        if problem is None and record.chunk_map and record.chunk_map_digest:
            chunk_path = os.path.join(os.path.dirname(path),
                                      check_safe_name(record.chunk_map, "chunk map"))
            problem, lasting = _file_problem(chunk_path, f"chunk map {record.chunk_map}",
                                             record.chunk_map_digest)
        if (problem is None or lasting) and \
                not self.repo.set_damage_mark(manifest, record.disk.target, problem):
            log.info("cannot record the state of backup %s disk %s in %s",
                     manifest.backup_id, record.disk.target, self.name)
        return problem

    def _layer_problem(self, manifest: Manifest, record: DiskRecord) -> str | None:
        """A cheap check that a layer can be built on: recorded damage, presence, size."""
        mark = self.repo.damage_mark(manifest, record.disk.target)
        if mark is not None:
            return mark
        try:
            size = os.stat(self.repo.data_file(manifest, record)).st_size
        except FileNotFoundError:
            return f"{record.data_file} is missing"
        except OSError as err:
            return f"{record.data_file} unreadable: {err.strerror}"
        if record.file_size is not None and size != record.file_size:
            return f"{record.data_file} has {size} bytes, not {record.file_size}"
        header = self.header_problem(manifest, record)
        if header is not None:
            return header
        if record.chunk_map:  # a resync compares with it; verify counts it as stored data
            directory = self.repo.backup_dir(manifest.domain_uuid, manifest.backup_id)
            if not os.path.isfile(os.path.join(
                    directory, check_safe_name(record.chunk_map, "chunk map"))):
                return f"chunk map {record.chunk_map} is missing"
        return None

    def header_problem(self, manifest: Manifest, record: DiskRecord) -> str | None:
        """What in a layer's header this tool did not write (read before any of its data).

        Its backing file must be exactly the one the manifest's parent link implies.
        """
        try:
            expected = _expected_backing(record)
        except UsageError as err:  # a malformed parent id or disk name in the manifest
            return f"{record.data_file}: {err}"
        if record.backing_file is not None and record.backing_file != expected:
            return (f"{record.data_file}: the manifest names backing file "
                    f"{record.backing_file!r}, its parent link implies {expected!r}")
        problem = layers.file_problem(self.repo.data_file(manifest, record), expected,
                                      record.size)
        return None if problem is None else f"{record.data_file} {problem}"

    def _layer_paths(self, points: list[DiskPoint]) -> list[str]:
        """The data files of a point's layers (itself first), as the layout places them."""
        return [self.repo.data_file(p.manifest, p.record) for p in points]

    def image_node(self, points: list[DiskPoint]) -> dict[str, Any]:
        return layers.file_chain(self._layer_paths(points))

    def qemu_objects(self) -> tuple[dict[str, Any], ...]:
        """``object-add`` arguments the nodes of :meth:`image_node` need: none."""
        return ()

    def holds(self, path: str) -> bool:
        return self.repo.holds(path)


class VolumeStore:
    """Backups inside an NBD export (:class:`NbdVolume`)."""

    local_layers = False

    def __init__(self, volume: NbdVolume) -> None:
        self.volume = volume
        self.name = volume.address.uri
        self.repo_id = volume.repo_id
        self._objects = img.objects(*volume.qemu_img_objects())
        self._checked: dict[int, bytes] = {}  # region offset -> the header bytes checked
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> VolumeStore:
        self._objects.__enter__()  # qemu-img calls of this store get the TLS object
        return self

    def __exit__(self, *exc: object) -> None:
        self._objects.__exit__(None, None, None)
        self.volume.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    @contextmanager
    def lock(self, domain_uuid: str) -> Iterator[None]:
        """One writer per volume, from any host: the lease kept in the volume itself."""
        self.volume.take_lease()
        self.repo_id = self.volume.repo_id  # as read back with the lease
        try:
            yield
        finally:
            self.volume.release_lease()

    def _lock(self, kind: str, busy: str) -> ContextManager[None]:
        directory = lock_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        key = hashlib.sha256(self.volume.address.uri.encode()).hexdigest()[:16]
        return exclusive(os.path.join(directory, f"volume-{key}{kind}.lock"), busy)

    def scan(self, domain_uuid: str | None = None) -> Scan:
        return self.volume.scan(domain_uuid)

    @contextmanager
    def session(self, domain_uuid: str, backup_id: str) -> Iterator[Session]:
        with tempfile.TemporaryDirectory(prefix="rdmb-session-") as scratch:
            yield NbdSink(self.volume, scratch)

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
        problem = layers.header_problem(data, None, record.size)
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
        return layers.chain_node(files)

    def qemu_objects(self) -> tuple[dict[str, Any], ...]:
        """``object-add`` arguments the nodes of :meth:`image_node` need (TLS credentials)."""
        tls = self.volume.tls_object()
        return () if tls is None else (tls,)

    def holds(self, path: str) -> bool:
        """False: the volume's file is on the backup server, not a local path of this store."""
        return False


def _file_problem(path: str, what: str, expected: Digest) -> tuple[str | None, bool]:
    """What is wrong with a stored file, and whether it lasts (not a read error)."""
    if not os.path.exists(path):
        return f"{what} is missing", True
    try:
        digest = file_digest(path, expected.algorithm)
    except OSError as err:
        return f"{what} unreadable: {err.strerror}", False
    if digest.value != expected.value:
        return f"{what}: {digest.algorithm} mismatch", True
    return None, False


def _expected_backing(record: DiskRecord) -> str | None:
    """The backing file name a file repository's layer has: its parent's layer, as the
    layout places it (``../<parent id>/<disk>.qcow2``), or none for a full copy."""
    if record.parent is None:
        return None
    parent = check_backup_id(record.parent)
    return os.path.join("..", parent, f"{check_safe_name(record.disk.target, 'disk name')}"
                                      f".{DATA_FORMAT}")
