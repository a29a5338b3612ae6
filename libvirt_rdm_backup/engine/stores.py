"""Where backups are kept: a file repository, an NBD volume or a Ceph pool, behind one
small interface.

A store lists its backups and the damaged ones (:meth:`Store.scan`), opens the
session a new backup is written through (its own kind of sink, which publishes
the manifest), tells what is wrong with a stored layer (:meth:`Store.damage`),
and gives QEMU a point's layers (:meth:`Store.image_node`). Chosen by the
target's form: a directory, an ``nbd://`` URI, or an ``rbd://`` URI.
"""

from __future__ import annotations

from contextlib import AbstractContextManager as ContextManager
from typing import Any, Protocol

from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.merge_plan import PlannedMerge
from libvirt_rdm_backup.engine.rbd_store import RbdStore
from libvirt_rdm_backup.engine.sinks import Session
from libvirt_rdm_backup.engine.volume_store import VolumeStore
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.modes import Compression
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.qemu.secrets import LayerKey
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.store import Repository, Scan
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.uri import NbdAddress, RbdAddress, parse_target


class Store(Protocol):
    """A place that keeps backups."""

    name: str  # the directory or the URI, for messages
    repo_id: str  # short id, part of the names of QEMU bitmaps of this store
    local_layers: bool  # layers are local files (chunk maps need that)
    resync_layers: bool  # takes resync layers: chunks compared with a point (map or read back)
    storage_layers: bool  # takes layers of ranges copied from storage snapshots
    self_contained: bool  # each point is a complete image (no layer builds on another)

    def __enter__(self) -> Store: ...

    def __exit__(self, *exc: object) -> None: ...

    def keys(self) -> ContextManager[None]:
        """The key's secret for the QEMUs started in the block (held while the store is
        entered; again for work after it, such as ``backup --prune``)."""
        ...

    def lock(self, domain_uuid: str) -> ContextManager[None]:
        """Be the one writer of the domain's backups (fails at once when taken)."""
        ...

    def consolidate(self, domain_uuid: str, chain: Chain, drop: set[str], speed: int = 0
                    ) -> tuple[list[PlannedMerge], int]:
        """Drop the points ``drop`` of ``chain``, their data merged into the kept points
        that build on them (each still reads as before); the merges done and the bytes
        given back. The caller holds :meth:`lock` and decided what to drop under it."""
        ...

    def reading(self, domain_uuid: str) -> ContextManager[None]:
        """While held, no prune changes the domain's backups (waits for a running one;
        finishes one that was cut short first, where the store can be written)."""
        ...

    def scan(self, domain_uuid: str | None = None) -> Scan:
        """Readable backups (of all domains, or of one), oldest first, and damaged ones."""
        ...

    def new_layers(self, compression: Compression | None) -> LayerFormat:
        """How the new layers of a backup are written (compressed, encrypted)."""
        ...

    def session(self, domain_uuid: str, backup_id: str,
                layer_format: LayerFormat = PLAIN) -> ContextManager[Session]:
        """Where a new backup is written (its new layers as ``layer_format`` says);
        nothing of it is visible until it is published."""
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
               tls_dir: str | None = None, key_file: str | None = None) -> Store:
    """The store named by ``target`` (a directory, an NBD URI or an RBD URI).

    ``nbds://`` targets need ``tls_dir``: a directory with ``ca-cert.pem``,
    ``client-cert.pem`` and ``client-key.pem`` (QEMU's and libnbd's names).
    ``key_file``: holds the key of encrypted layers (checked against the key ids the
    store records: UsageError when it is not that key; reading an encrypted point or
    adding a backup to an encrypted store without a key is refused too).
    """
    parsed = parse_target(target, allow_remote_plain=allow_plain_nbd)
    if isinstance(parsed, RbdAddress):
        if tls_dir is not None:
            raise UsageError("--tls-creds applies to nbds:// targets only")
        if key_file is not None:
            raise UsageError("rbd:// targets keep no encrypted layers; give no "
                             "--encrypt-key-file (Ceph's own encryption at rest applies)")
        return RbdStore.open(parsed, create=create)
    key = LayerKey.from_file(key_file) if key_file is not None else None
    if isinstance(parsed, NbdAddress):
        if parsed.tls and tls_dir is None:
            raise UsageError(f"{target} is TLS: give --tls-creds DIR")
        if tls_dir is not None and not parsed.tls:
            raise UsageError(f"--tls-creds needs an nbds:// target, not {target}")
        return VolumeStore(NbdVolume.open(parsed, create=create, tls_dir=tls_dir), key)
    if tls_dir is not None:
        raise UsageError("--tls-creds applies to nbds:// targets only")
    return FileStore(Repository.open(parsed, create=create), key)
