"""A store of backups in a Ceph pool: an ``rbd://`` target (:mod:`stores`).

Per backed-up disk one thin RBD image, ``BASE.DOMAIN_UUID.DISK`` (``BASE``: the
target's prefix, else ``rdmb``); each point is a snapshot of it named after the
backup id, a complete image that Ceph shares copy-on-write with its neighbours.
The manifests (with the disks' mappings) are values of the omap of one rados
object, ``BASE.index``, keyed ``m.DOMAIN_UUID.BACKUP_ID``; a point is published
by one atomic omap write, after its snapshots exist. Restores read one snapshot;
prunes drop manifests and snapshots (the kept points' parents re-pointed in the
same index write), and Ceph gives the space back: nothing is merged. The index is
read within bounds (:mod:`.rbd_index`): its size is not this host's to trust.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

from libvirt_rdm_backup.engine.consolidate import merged_manifest
from libvirt_rdm_backup.engine.merge_plan import PlannedMerge
from libvirt_rdm_backup.engine.rbd_index import Pick, read_index
from libvirt_rdm_backup.engine.rbd_sink import RbdSink, secret_id
from libvirt_rdm_backup.engine.sinks import Session
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    NotFoundError,
    RdmBackupError,
    RepositoryError,
    UsageError,
)
from libvirt_rdm_backup.modes import Compression
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.ids import BACKUP_ID_RE, check_uuid
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST, Manifest
from libvirt_rdm_backup.repository.order import in_order
from libvirt_rdm_backup.repository.store import Damage, Scan
from libvirt_rdm_backup.storage.rbd_pool import RbdPool
from libvirt_rdm_backup.targets.uri import RbdAddress

REPO_KEY = "repo_id"
MANIFEST_PREFIX = "m."
_REPO_ID_RE = re.compile(r"[0-9a-f]{6}")  # as secrets.token_hex(3) writes it (fullmatch)
_DISK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a disk name in an image name


class RbdStore:
    """Backups as RBD images and snapshots, their manifests in the pool's index object."""

    local_layers = False
    resync_layers = False  # no resync layers: a point is an image, not a chain of layers
    storage_layers = True  # written onto the image holding the last point
    self_contained = True

    def __init__(self, address: RbdAddress, pool: RbdPool) -> None:
        self.address = address
        self.pool = pool
        self.name = address.uri
        self.repo_id = ""
        self.base = address.prefix or "rdmb"
        self.index = f"{self.base}.index"
        self._secret = secret_id()
        self._objects: ContextManager[None] | None = None
        self._memfd = -1

    @classmethod
    def open(cls, address: RbdAddress, create: bool = False) -> RbdStore:
        """Connect; an index is started when ``create`` (else NotFoundError without one)."""
        store = cls(address, RbdPool(address.conf, address.user, address.pool).connect())
        try:
            found = store.pool.omap_values(store.index, [REPO_KEY])[0].get(REPO_KEY)
            if found is None and not create:
                raise NotFoundError(f"{address.uri} holds no backups (no {store.index})")
            if found is None:
                found = secrets.token_hex(3).encode()
                store.pool.set_omap(store.index, {REPO_KEY: found})
            store.repo_id = found.decode("ascii", "replace") if len(found) == 6 else ""
            if not _REPO_ID_RE.fullmatch(store.repo_id):  # it names bitmaps and snapshots
                raise RepositoryError(f"{address.uri.partition('?')[0]}: {store.index} holds "
                                      "no valid repository id")
        except BaseException:
            store.pool.close()
            raise
        return store

    def __enter__(self) -> RbdStore:
        """qemu-img calls meanwhile get the key as a ``secret`` object reading an inherited
        memory file (``/dev/fd/N``): never in argv."""
        self._memfd = os.memfd_create("rdmb-key", os.MFD_CLOEXEC)
        os.write(self._memfd, self.pool.key.encode("ascii"))
        self._objects = img.objects(
            f"secret,id={self._secret},format=base64,file=/dev/fd/{self._memfd}",
            fds=(self._memfd,))
        self._objects.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._objects is not None:
            self._objects.__exit__(None, None, None)
            os.close(self._memfd)
            self._objects = None
        self.pool.close()

    def image_name(self, domain_uuid: str, disk: str) -> str:
        """The image of a domain's disk (UsageError for a disk name with a dot, which could
        name an image of a target whose prefix is ``BASE.UUID``)."""
        if not _DISK_RE.fullmatch(disk):
            raise UsageError(f"disk name {disk[:64]!r} cannot name an image of an rbd:// "
                             "target (letters, digits, _ and -)")
        return f"{self.base}.{domain_uuid}.{disk}"

    def node(self, image: str, snapshot: str | None, secret: str) -> dict[str, Any]:
        """Blockdev options of an image (raw; read-only at ``snapshot``)."""
        file: dict[str, Any] = {
            "driver": "rbd", "pool": self.address.pool, "image": image,
            "user": self.address.user, "key-secret": secret, "auth-client-required": ["cephx"],
            "server": [{"host": h, "port": str(p)} for h, p in self.pool.monitors()]}
        if snapshot is not None:
            file["snapshot"] = snapshot
        return {"driver": "raw", "file": file}

    def lock(self, domain_uuid: str) -> ContextManager[None]:
        """One writer of the domain's backups, from any host (a rados lock on the index)."""
        return self.pool.locked(self.index, f"writer.{domain_uuid}")

    def reading(self, domain_uuid: str) -> ContextManager[None]:
        """Nothing to hold: a prune meanwhile makes a read fail, never read wrong data."""
        return nullcontext()

    def scan(self, domain_uuid: str | None = None) -> Scan:
        """The index's manifests, each checked to be one this tool writes: its key (a
        domain UUID and a backup id), its size, and the names its disks give images. Read
        within bounds (:mod:`.rbd_index`): only the values of such keys (of the domain,
        when one is asked) are read; a malformed ``m.`` key is damage without its value
        being read, any other key is left alone."""

        def pick(key: str) -> Pick:
            if not key.startswith(MANIFEST_PREFIX):
                return None
            uuid, backup_id = _split(key)
            if domain_uuid is not None and uuid != domain_uuid:
                return None
            return "key" if _key_problem(uuid, backup_id) else "value"

        def parse(key: str, value: bytes | None) -> Manifest | Damage:
            uuid, backup_id = _split(key)
            try:
                return _checked(uuid, backup_id, value)
            except RepositoryError as err:
                return Damage(uuid[:64], backup_id[:64], str(err))

        where = f"{self.address.uri.partition('?')[0]}: {self.index}"
        found = read_index(self.pool, self.index, where, pick, parse)
        return Scan(in_order([m for m in found if isinstance(m, Manifest)]),
                    [d for d in found if isinstance(d, Damage)])

    def write_manifests(self, manifests: list[Manifest], drop: tuple[str, ...] = ()) -> None:
        """Publish new or changed manifests and remove dropped keys, in one atomic write."""
        taken = max((m.sequence or 0 for m in self.scan().backups), default=0)
        values = {}
        for manifest in manifests:
            if manifest.sequence is None:
                taken += 1
                manifest.sequence = taken
            values[self._key(manifest.domain_uuid, manifest.backup_id)] = \
                manifest.dumps().encode()
        self.pool.set_omap(self.index, values, drop)

    def _key(self, domain_uuid: str, backup_id: str) -> str:
        return f"{MANIFEST_PREFIX}{domain_uuid}.{backup_id}"

    def keys(self) -> ContextManager[None]:
        """Nothing to hold: the tool encrypts no RBD image."""
        return nullcontext()

    def new_layers(self, compression: Compression | None) -> LayerFormat:
        """Raw images, neither compressed nor encrypted (UsageError when asked for)."""
        if compression is not None:
            raise UsageError("rbd:// targets keep raw images: --compress applies to qcow2 "
                             "layers (file and nbd targets)")
        return PLAIN

    @contextmanager
    def session(self, domain_uuid: str, backup_id: str,
                layer_format: LayerFormat = PLAIN) -> Iterator[Session]:
        if layer_format != PLAIN:
            raise UsageError("rbd:// targets keep raw images: --compress and "
                             "--encrypt-key-file apply to qcow2 layers (file and nbd targets)")
        sink = RbdSink(self, domain_uuid, backup_id)
        try:
            yield sink
        finally:
            sink.discard()  # the snapshots of a backup that was not published

    def consolidate(self, domain_uuid: str, chain: Chain, drop: set[str], speed: int = 0
                    ) -> tuple[list[PlannedMerge], int]:
        """Drop points: their manifests go (the kept ones' parents re-pointed in the same
        index write), then their snapshots; no merge. The bytes Ceph gave back."""
        images = sorted({self.image_name(domain_uuid, d.disk.target)
                         for m in chain.backups for d in m.disks})
        before = sum(self.pool.used(i) for i in images)
        by_id = {m.backup_id: m for m in chain.backups}
        changed = [m for m in (self._repointed(m, drop, by_id) for m in chain.backups
                               if m.backup_id not in drop) if m is not None]
        self.write_manifests(changed, tuple(self._key(domain_uuid, b) for b in sorted(drop)
                                            if b in by_id))
        self._remove_unlisted(domain_uuid, images)
        return [], max(0, before - sum(self.pool.used(i) for i in images))

    @staticmethod
    def _repointed(manifest: Manifest, drop: set[str], by_id: dict[str, Manifest]
                   ) -> Manifest | None:
        """A kept manifest whose disks' parents skip the dropped points (None: unchanged)."""
        records = []
        for record in manifest.disks:
            parent = record.parent
            while parent is not None and parent in drop:
                below = by_id[parent].disk(record.disk.target) if parent in by_id else None
                parent = below.parent if below is not None else None
            if parent != record.parent:
                records.append(replace(record, parent=parent, level=record.level
                                       if parent is not None else "full"))
        return merged_manifest(manifest, records, drop, by_id)

    def _remove_unlisted(self, domain_uuid: str, images: list[str]) -> None:
        """Remove the snapshots of the domain's images that no index entry names (readable
        or not); only those named as this tool names them (a backup id): another snapshot
        is left alone."""
        found = self.scan()
        listed = {m.backup_id for m in found.backups} | {d.backup_id for d in found.damaged}
        for image in images:
            for snapshot in self.pool.snapshots(image):
                if snapshot not in listed and BACKUP_ID_RE.fullmatch(snapshot):
                    self.pool.remove_snapshot(image, snapshot)

    def chunk_map(self, point: DiskPoint) -> ChunkMap | None:
        """None: an rbd:// target keeps no chunk maps."""
        return None

    def damage(self, point: DiskPoint, digests: bool = False) -> str | None:
        """Cheap: the point's snapshot exists, of the point's size; with ``digests``: its
        contents' digest."""
        record = point.record
        try:
            image, snapshot = self._where(point)
            size = self.pool.snapshot_sizes(image).get(snapshot)
            if size is None:
                return f"{image}: snapshot {snapshot} is missing"
            if size != record.size:
                return f"{image}@{snapshot} has {size} bytes, the manifest says {record.size}"
            if not digests:
                return None
            value = self.pool.digest(image, snapshot, record.digest.algorithm)
        except RdmBackupError as err:
            return f"{record.data_file[:200]} unreadable: {err}"
        if value != record.digest.value:
            return f"{image}@{snapshot}: {record.digest.algorithm} mismatch"
        return None

    def _where(self, point: DiskPoint) -> tuple[str, str]:
        """The image and snapshot of a point, which must be where this store writes it:
        the domain's disk's image, the snapshot named after the backup (RepositoryError:
        a location edited to name another image or snapshot is never opened)."""
        image = self.image_name(point.manifest.domain_uuid, point.record.disk.target)
        want = {"pool": self.address.pool, "image": image, "snapshot": point.backup_id}
        if point.record.location != want:
            raise RepositoryError(f"its location {json.dumps(point.record.location)[:200]} "
                                  f"is not {self.address.pool}/{image}@{point.backup_id}, "
                                  "where this target keeps it")
        return image, point.backup_id

    def image_node(self, points: list[DiskPoint]) -> dict[str, Any]:
        """The point's snapshot alone (a complete image: no chain to open)."""
        try:
            image, snapshot = self._where(points[0])
        except RepositoryError as err:
            raise DamagedBackupError(points[0].backup_id, str(err),
                                     points[0].record.disk.target) from err
        return self.node(image, snapshot, self._secret)

    def qemu_objects(self, secret: str | None = None) -> tuple[dict[str, Any], ...]:
        """The ``secret`` object holding the key (for private QEMU processes, over QMP)."""
        return ({"qom-type": "secret", "id": secret or self._secret, "data": self.pool.key,
                 "format": "base64"},)

    def holds(self, path: str) -> bool:
        """False: the images are in the cluster, not local paths."""
        return False


def _split(key: str) -> tuple[str, str]:
    """The domain UUID and backup id an ``m.`` key names (as written; unchecked)."""
    uuid, _, backup_id = key[len(MANIFEST_PREFIX):].partition(".")
    return uuid, backup_id


def _key_problem(uuid: str, backup_id: str) -> str | None:
    """Why ``m.UUID.BACKUP_ID`` is no key this tool writes (None: it is one)."""
    try:
        canonical = check_uuid(uuid) == uuid
    except UsageError:
        canonical = False
    if not canonical or not BACKUP_ID_RE.fullmatch(backup_id):
        return (f"index key {MANIFEST_PREFIX}{uuid[:64]}.{backup_id[:64]} is not a domain "
                "UUID and a backup id")
    return None


def _checked(uuid: str, backup_id: str, value: bytes | None) -> Manifest:
    """The manifest under key ``m.UUID.BACKUP_ID``, once it is one this tool could have
    written there (raises RepositoryError): canonical UUID, backup id, at most
    MAX_MANIFEST bytes, naming itself, its disks with names fit for image names."""
    problem = _key_problem(uuid, backup_id)
    if problem is not None or value is None:
        raise RepositoryError(problem or f"index key {MANIFEST_PREFIX}{uuid}.{backup_id} "
                              "was not read")
    if len(value) > MAX_MANIFEST:
        raise RepositoryError(f"manifest of {len(value)} bytes (at most {MAX_MANIFEST})")
    manifest = Manifest.loads(value.decode("utf-8", "replace"))
    if (manifest.domain_uuid, manifest.backup_id) != (uuid, backup_id):
        raise RepositoryError(f"manifest of {manifest.backup_id[:64]} under the key of "
                              f"{backup_id}")
    for record in manifest.disks:
        if not _DISK_RE.fullmatch(record.disk.target):
            raise RepositoryError(f"malformed disk name {record.disk.target[:64]!r}")
    return manifest
