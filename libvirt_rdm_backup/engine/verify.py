"""Verify: recompute the digests of stored data and compare with the manifests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup.errors import NotFoundError
from libvirt_rdm_backup.repository.chain import lineage
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository


@dataclass
class DiskCheck:
    """The verdict on one stored disk."""

    backup_id: str
    disk: str
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


def check_disk(repo: Repository, manifest: Manifest, record: DiskRecord) -> DiskCheck:
    """Recompute one data file's digest."""
    path = repo.data_file(manifest, record)
    if not os.path.exists(path):
        return DiskCheck(manifest.backup_id, record.disk.target, False,
                         f"data file {record.data_file} is missing")
    try:
        digest = file_digest(path, record.digest.algorithm)
    except OSError as err:
        return DiskCheck(manifest.backup_id, record.disk.target, False, f"unreadable: {err}")
    if digest.value != record.digest.value:
        return DiskCheck(manifest.backup_id, record.disk.target, False,
                         f"{record.data_file}: {digest.algorithm} mismatch")
    if record.chunk_map and record.chunk_map_digest:
        chunk_path = os.path.join(os.path.dirname(path), record.chunk_map)
        try:
            chunk_digest = file_digest(chunk_path, record.chunk_map_digest.algorithm)
        except OSError as err:
            return DiskCheck(manifest.backup_id, record.disk.target, False,
                             f"chunk map {record.chunk_map} unreadable: {err}")
        if chunk_digest.value != record.chunk_map_digest.value:
            return DiskCheck(manifest.backup_id, record.disk.target, False,
                             f"chunk map {record.chunk_map}: {chunk_digest.algorithm} mismatch")
    return DiskCheck(manifest.backup_id, record.disk.target, True)


def verify_manifests(repo: Repository, manifests: list[Manifest]) -> VerifyReport:
    """Check every disk of every given backup, and that the layers it builds on exist."""
    report = VerifyReport()
    known: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        backups = known.setdefault(manifest.domain_uuid, repo.backups(manifest.domain_uuid))
        for record in manifest.disks:
            check = check_disk(repo, manifest, record)
            if check.ok:
                _points, missing = lineage(backups, manifest, record.disk.target)
                if missing is not None:
                    check = DiskCheck(manifest.backup_id, record.disk.target, False,
                                      f"builds on backup {missing}, which is missing")
            report.checks.append(check)
    return report


def verify(target: str, domain_uuid: str | None = None, backup_id: str | None = None
           ) -> VerifyReport:
    """Verify backups in the repository at ``target`` (all, one domain's, or one)."""
    repo = Repository.open(target)
    if backup_id is not None:
        manifests = [repo.find_backup(backup_id, domain_uuid)]
    else:
        manifests = repo.backups(domain_uuid)
    if not manifests:
        raise NotFoundError(f"no backups of domain {domain_uuid}" if domain_uuid else "no backups")
    return verify_manifests(repo, manifests)
