"""Verify: recompute the digests of stored data and compare with the manifests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup.engine.deep_verify import read_problem
from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.selection import choose_backup, domain_damage, find_domain_backups
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.errors import DamagedBackupError, NotFoundError
from libvirt_rdm_backup.repository.chain import DiskPoint, lineage
from libvirt_rdm_backup.repository.ids import check_backup_id
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.order import in_order
from libvirt_rdm_backup.repository.store import Damage

Checker = Callable[[DiskPoint], str | None]


@dataclass
class DiskCheck:
    """The verdict on one stored disk (``disk`` None: the whole backup is unreadable)."""

    backup_id: str
    disk: str | None
    ok: bool
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"backup_id": self.backup_id, "disk": self.disk, "ok": self.ok,
                "problem": self.problem}


@dataclass
class VerifyReport:
    """All verdicts of one verify run."""

    checks: list[DiskCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every stored disk matched its digest."""
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """The ``verify --json`` document."""
        return {"ok": self.ok, "checked": len(self.checks),
                "failed": sum(1 for c in self.checks if not c.ok),
                "disks": [c.to_dict() for c in self.checks]}


def cached_checker(store: Store) -> Checker:
    """:meth:`Store.damage` of a point (digests read), computed once per layer."""
    cache: dict[tuple[str, str], str | None] = {}

    def check(point: DiskPoint) -> str | None:
        key = (point.backup_id, point.record.disk.target)
        if key not in cache:
            cache[key] = store.damage(point, digests=True)
        return cache[key]

    return check


def lineage_problem(backups: list[Manifest], damaged: Mapping[str, str], manifest: Manifest,
                    disk: str, check: Checker) -> tuple[list[DiskPoint], str | None]:
    """The layers of a disk's point (itself first) and why it cannot be restored, or None.

    ``damaged``: backup id -> problem of the domain's backups with unreadable manifests.
    """
    points, missing = lineage(backups, manifest, disk)
    if missing is not None:
        if missing in damaged:
            return points, f"builds on backup {missing}, which is damaged: {damaged[missing]}"
        return points, f"the chain is broken: backup {missing} it builds on is missing"
    for index, point in enumerate(points):
        problem = check(point)
        if problem is not None:
            return points, problem if index == 0 else (
                f"builds on backup {point.backup_id}, which is damaged: {problem}")
    return points, None


def held_checker(store: FileStore, files: dict[tuple[str, str], str]) -> Checker:
    """:meth:`.FileStore.checked_layer` of a point, once per layer (its name into ``files``)."""
    problems: dict[tuple[str, str], str | None] = {}

    def check(point: DiskPoint) -> str | None:
        key = (point.backup_id, point.record.disk.target)
        if key not in problems:
            problems[key], files[key] = store.checked_layer(point)
        return problems[key]

    return check


def verify_lineage(store: Store, manifest: Manifest, disk: str, check: Checker | None = None
                   ) -> list[DiskPoint]:
    """Check every layer a disk's point is built from (raises DamagedBackupError)."""
    listed = store.scan(manifest.domain_uuid)
    damaged = {d.backup_id: d.problem for d in listed.damaged}
    points, problem = lineage_problem(listed.backups, damaged, manifest, disk,
                                      check or cached_checker(store))
    if problem is not None:
        raise DamagedBackupError(manifest.backup_id, f"{problem}; nothing was written", disk)
    return points


def opening_checker(store: Store, files: dict[tuple[str, str], str]) -> Checker:
    """The layer check of a command that opens the layers it checked: a file repository's
    are held open (:func:`held_checker`, their names into ``files``), others checked once
    (:func:`cached_checker`)."""
    return held_checker(store, files) if isinstance(store, FileStore) else \
        cached_checker(store)


def held_node(store: Store, points: list[DiskPoint], files: dict[tuple[str, str], str]
              ) -> dict[str, Any]:
    """The image node of ``points`` checked by :func:`opening_checker`: a file repository's
    layers by the names of their held descriptors (``/dev/fd/N``)."""
    if not isinstance(store, FileStore):
        return store.image_node(points)
    return store.image_node(points, [files[p.backup_id, p.record.disk.target] for p in points])


def checked_node(store: Store, manifest: Manifest, disk: str) -> dict[str, Any]:
    """The image node of a disk's point, every layer it is built from checked first
    (:func:`verify_lineage`). A file repository's layers are opened once, checked through
    those descriptors and held until the store is closed; the node names them
    ``/dev/fd/N``, and whatever opens it inherits them (:func:`.layers.held_fds`): QEMU
    reads the files that were checked, whatever their paths name meanwhile."""
    files: dict[tuple[str, str], str] = {}
    points = verify_lineage(store, manifest, disk, opening_checker(store, files))
    return held_node(store, points, files)


def verify_manifests(store: Store, manifests: list[Manifest],
                     damaged: list[Damage] | None = None, deep: bool = False) -> VerifyReport:
    """Check every disk of every given backup and every layer it builds on (``deep``: and
    read each point whole through QEMU, :mod:`.deep_verify`).

    ``damaged`` backups (unreadable manifests) are reported as failed. The report
    is oldest first (:func:`.order.in_order`), so that a damaged layer is reported
    before the points built on it.
    """
    report = VerifyReport()
    check = cached_checker(store)
    known: dict[str, tuple[list[Manifest], dict[str, str]]] = {}
    items: list[Manifest | Damage] = [*manifests, *(damaged or [])]
    for item in in_order(items):
        if isinstance(item, Damage):
            report.checks.append(DiskCheck(item.backup_id, None, False, item.problem))
            continue
        uuid = item.domain_uuid
        if uuid not in known:
            listed = store.scan(uuid)
            known[uuid] = (listed.backups, {d.backup_id: d.problem for d in listed.damaged})
        backups, unreadable = known[uuid]
        for record in item.disks:
            points, problem = lineage_problem(backups, unreadable, item, record.disk.target,
                                              check)
            if problem is None and deep:
                problem = read_problem(store, points)
            report.checks.append(DiskCheck(item.backup_id, record.disk.target,
                                           problem is None, problem))
    return report


def verify(target: str, domain: str | None = None, backup_id: str | None = None,
           tls_dir: str | None = None, deep: bool = False, key_file: str | None = None
           ) -> VerifyReport:
    """Verify backups at ``target`` (all, one domain's, or one backup); ``deep``: read
    every point through QEMU too (``key_file``: the key of encrypted points)."""
    with open_store(target, tls_dir=tls_dir, key_file=key_file) as store, \
            ExitStack() as stack:
        listed = store.scan()
        uuids = {m.domain_uuid for m in listed.backups} | {d.domain_uuid for d in listed.damaged}
        for uuid in sorted(uuids):
            stack.enter_context(store.reading(uuid))  # no prune changes what is checked
        damaged: list[Damage] = []
        if domain is not None and backup_id is not None:
            manifests = [choose_backup(store, domain, backup_id)]
        elif domain is not None:
            manifests = find_domain_backups(store, domain)
            damaged = domain_damage(store, domain, manifests)
        else:
            manifests, damaged = store.scan()
            if backup_id is not None:
                check_backup_id(backup_id)
                manifests = [m for m in manifests if m.backup_id == backup_id]
                damaged = [d for d in damaged if d.backup_id == backup_id]
        if not manifests and not damaged:
            raise NotFoundError(f"backup {backup_id} not found" if backup_id else "no backups")
        return verify_manifests(store, manifests, damaged, deep)
