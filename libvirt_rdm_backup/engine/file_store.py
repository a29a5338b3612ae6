"""A store of backups as directories of qcow2 files: a file repository (:mod:`stores`)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from libvirt_rdm_backup.engine import consolidate
from libvirt_rdm_backup.engine.merge_plan import PlannedMerge, check_merge_keys, plan_file_merges
from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.sinks import FileSink, Session
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    OperationError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.modes import Compression
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.qemu.secrets import LayerKey, key_file, secret_definition, secret_object
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint, lineage
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.digest import Digest, file_digest, file_digests
from libvirt_rdm_backup.repository.encryption import check_key, new_record, read_record
from libvirt_rdm_backup.repository.ids import check_safe_name, now_iso
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.prune_journal import Journal, journal_path, write_journal
from libvirt_rdm_backup.repository.rekey_journal import journal_path as rekey_journal_path
from libvirt_rdm_backup.repository.rekey_journal import unfinished
from libvirt_rdm_backup.repository.store import Repository, Scan

log = logging.getLogger("libvirt_rdm_backup.engine.stores")

GATE_TIMEOUT = 600.0  # seconds readers and prunes wait for each other


class FileStore:
    """Backups as directories of qcow2 files (:class:`Repository`)."""

    local_layers = True
    resync_layers = True  # takes resync layers (compared with a chunk map or read back)
    storage_layers = True
    self_contained = False

    def __init__(self, repo: Repository, key: LayerKey | None = None) -> None:
        self.repo = repo
        self.name = repo.root
        self.repo_id = repo.repo_id
        self.key = key
        self.encryption = read_record(repo.root)
        if key is not None:  # without one, digests can be checked, but nothing decrypted
            self.refuse_unfinished_rekey()
            check_key(self.encryption, key.key_id, f"repository {repo.root}")
        self._stack = ExitStack()
        self._objects: tuple[dict[str, Any], ...] = ()

    def __enter__(self) -> FileStore:
        self._stack.enter_context(self.keys())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @contextmanager
    def keys(self) -> Iterator[None]:
        """Every QEMU started in the block gets the key from a private file (none without
        a key); :meth:`__enter__` holds it for the store's block."""
        if self.key is None:
            yield
            return
        with key_file(self.key) as path, img.objects(secret_definition(path)):
            saved, self._objects = self._objects, (secret_object(path),)
            try:
                yield
            finally:
                self._objects = saved

    def new_layers(self, compression: Compression | None) -> LayerFormat:
        """How the layers of a new backup are written: encrypted when a key was given (the
        repository's first encrypted backup records its key id when it is published)."""
        if self.key is None:
            check_key(self.encryption, None, f"repository {self.name}")  # no plain points
            return LayerFormat(compression)
        if self.encryption is None:
            self.encryption = new_record(self.key.key_id)
        return LayerFormat(compression, self.encryption.key_id)

    @contextmanager
    def lock(self, domain_uuid: str) -> Iterator[None]:
        """The domain's lock; a prune cut short is finished first, its leftovers removed."""
        with self.repo.lock(domain_uuid):
            self.refuse_unfinished_rekey()
            directory = self.repo.domain_dir(domain_uuid)
            if os.path.lexists(journal_path(directory)):
                with self.repo.prune_gate(domain_uuid, True, GATE_TIMEOUT):
                    consolidate.finish(self.repo, domain_uuid)
            consolidate.remove_pruned(directory)
            yield

    def consolidate(self, domain_uuid: str, chain: Chain, drop: set[str], speed: int = 0
                    ) -> tuple[list[PlannedMerge], int]:
        """Drop the points ``drop`` of ``chain`` and merge their data into the kept points
        (journaled, :mod:`.consolidate`), once the domain's readers are done; the merges
        and the bytes the domain's directory gave back. The caller holds :meth:`lock`."""
        check_merge_keys(self.check_key, chain)
        with self.repo.prune_gate(domain_uuid, True, GATE_TIMEOUT):
            directory = self.repo.domain_dir(domain_uuid)
            before = _allocated(directory)
            merges = plan_file_merges(self.repo, chain, drop)
            journal = Journal(domain_uuid, chain.name, now_iso(),
                              tuple(m.backup_id for m in chain.backups
                                    if m.backup_id in drop),
                              tuple(p.merge for p in merges))
            consolidate.check(self.repo, journal)  # what a rerun checks, before anything
            consolidate.check_layers(self.repo, journal)
            write_journal(directory, journal)
            try:
                consolidate.carry_out(self.repo, journal, speed)
            except (RdmBackupError, OSError):
                try:  # kept layers published as they are, the dropped points left
                    consolidate.abandon(self.repo, journal)
                except (RdmBackupError, OSError) as err:
                    log.warning("the failed prune could not be given up: %s; the next "
                                "backup or prune of the domain finishes it", err)
                raise
            return merges, max(0, before - _allocated(directory))

    @contextmanager
    def reading(self, domain_uuid: str) -> Iterator[None]:
        """While the domain's backups are read, no prune changes them (one cut short is
        finished first, when the repository can be written)."""
        directory = self.repo.domain_dir(domain_uuid)
        if os.path.lexists(journal_path(directory)):
            try:
                with self.lock(domain_uuid):
                    pass
            except OperationError as err:  # a backup or prune holds the lock: it finishes
                log.info("%s", err)
            except RdmBackupError as err:  # a journal that cannot be finished: said below
                log.warning("%s", err)
        with self.repo.prune_gate(domain_uuid, False, GATE_TIMEOUT):
            self.refuse_unfinished_rekey()
            if os.path.lexists(journal_path(directory)):
                raise OperationError(f"a prune of domain {domain_uuid} was cut short and "
                                     "could not be finished; run prune again")
            yield

    def refuse_unfinished_rekey(self) -> None:
        """OperationError while a key change of the repository is unfinished (its layers'
        digests and key ids are being changed; see :mod:`.rekey`)."""
        if os.path.lexists(rekey_journal_path(self.repo.root)):
            raise unfinished(f"repository {self.name}")

    def scan(self, domain_uuid: str | None = None) -> Scan:
        return self.repo.scan(domain_uuid)

    @contextmanager
    def session(self, domain_uuid: str, backup_id: str,
                layer_format: LayerFormat = PLAIN) -> Iterator[Session]:
        with self.repo.staging(domain_uuid, backup_id) as staging:
            yield FileSink(self.repo, staging, self._lower_paths, layer_format,
                           self.key, self._objects, self.encryption)

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

    def checked_layer(self, point: DiskPoint) -> tuple[str | None, str]:
        """A point's layer file opened once, not through a symlink, and held open until the
        store is closed: what is wrong with it, checked through that descriptor as
        :meth:`damage` with digests checks it (None: nothing), and the name ``/dev/fd/N``
        by which a process that inherits the descriptor opens that very file, whatever its
        path names meanwhile."""
        record = point.record
        try:
            fd = os.open(self.repo.data_file(point.manifest, record),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:  # told (and recorded) as a check by path tells it
            return self._check(point.manifest, record) or \
                f"{record.data_file} cannot be opened: {err.strerror}", ""
        self._stack.callback(os.close, fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return self._check(point.manifest, record) or \
                f"{record.data_file} is not a regular file", ""
        return self._check(point.manifest, record, fd), f"/dev/fd/{fd}"

    def _check(self, manifest: Manifest, record: DiskRecord, fd: int | None = None
               ) -> str | None:
        """What is wrong with a disk's stored data (digests of data file and chunk map;
        ``fd``: the data file read through that descriptor).

        A mismatch is recorded beside the data, for the cheap checks of later
        backups; a match clears such a record (the data was repaired). The layer's
        header is checked first (:meth:`header_problem`).
        """
        path = self.repo.data_file(manifest, record)
        problem, lasting = self.header_problem(manifest, record, fd), True
        if problem is None:
            problem, lasting = _file_problem(path if fd is None else fd, record.data_file,
                                             record.digest)
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

    def header_problem(self, manifest: Manifest, record: DiskRecord, fd: int | None = None
                       ) -> str | None:
        """What in a layer's header this tool did not write (read before any of its data;
        ``fd``: through that descriptor).

        Its backing file must be exactly the one the manifest's parent link implies.
        """
        try:
            expected = _expected_backing(record)
        except UsageError as err:  # a malformed parent id or disk name in the manifest
            return f"{record.data_file}: {err}"
        if record.backing_file is not None and record.backing_file != expected:
            return (f"{record.data_file}: the manifest names backing file "
                    f"{record.backing_file!r}, its parent link implies {expected!r}")
        encrypted = record.encryption is not None
        if fd is None:
            problem = layers.file_problem(self.repo.data_file(manifest, record), expected,
                                          record.size, encrypted)
        else:
            try:
                head = os.pread(fd, layers.HEADER_READ, 0)
            except OSError as err:
                return f"{record.data_file} is unreadable: {err.strerror}"
            problem = layers.header_problem(head, expected, record.size, encrypted)
        return None if problem is None else f"{record.data_file} {problem}"

    def _layer_paths(self, points: list[DiskPoint]) -> list[str]:
        """The data files of a point's layers (itself first), as the layout places them."""
        return [self.repo.data_file(p.manifest, p.record) for p in points]

    def image_node(self, points: list[DiskPoint], files: list[str] | None = None
                   ) -> dict[str, Any]:
        """``files``: the layer files to open (:meth:`checked_layer`), else their paths."""
        for point in points:
            self.check_key(point)
        return layers.chain_node([layers.file_node(p) for p in files or self._layer_paths(points)],
                                 [p.record.encryption is not None for p in points])

    def check_key(self, point: DiskPoint) -> None:
        """Refuse (UsageError) to read an encrypted point without its key."""
        encryption = point.record.encryption
        if encryption is None:
            return
        if self.key is None:
            raise UsageError(f"backup {point.backup_id} disk {point.record.disk.target} is "
                             "encrypted: give --encrypt-key-file FILE")
        if self.encryption is None or encryption.get("key_id") != self.encryption.key_id:
            raise UsageError(f"backup {point.backup_id} disk {point.record.disk.target} was "
                             "encrypted with another key than --encrypt-key-file")

    def qemu_objects(self) -> tuple[dict[str, Any], ...]:
        """``object-add`` arguments the nodes of :meth:`image_node` need: the key's secret
        (a file of the command's life) when a key was given."""
        return self._objects

    def holds(self, path: str) -> bool:
        return self.repo.holds(path)


def _file_problem(path: str | int, what: str, expected: Digest) -> tuple[str | None, bool]:
    """What is wrong with a stored file (a path, or an open descriptor), and whether it
    lasts (not a read error)."""
    if isinstance(path, str) and not os.path.exists(path):
        return f"{what} is missing", True
    try:
        digest = (file_digest(path, expected.algorithm) if isinstance(path, str) else
                  file_digests(path, (0, 0), expected.algorithm)[0])
    except OSError as err:
        return f"{what} unreadable: {err.strerror}", False
    if digest.value != expected.value:
        return f"{what}: {digest.algorithm} mismatch", True
    return None, False


def _expected_backing(record: DiskRecord) -> str | None:
    """The backing file name a file repository's layer has (see
    :func:`.consolidate.backing_name`)."""
    return consolidate.backing_name(record.parent, record.disk.target)


def _allocated(directory: str) -> int:
    """Bytes the files under ``directory`` take on disk."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total

