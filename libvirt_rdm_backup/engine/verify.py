"""Verify: recompute the digests of stored data and compare with the manifests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.errors import NotFoundError
from libvirt_rdm_backup.repository.chain import lineage
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import check_backup_id


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


def check_disk(store: Store, manifest: Manifest, record: DiskRecord) -> DiskCheck:
    """Recompute the digests of one disk's stored data."""
    problem = store.check(manifest, record)
    return DiskCheck(manifest.backup_id, record.disk.target, problem is None, problem)


def verify_manifests(store: Store, manifests: list[Manifest]) -> VerifyReport:
    """Check every disk of every given backup, and that the layers it builds on exist."""
    report = VerifyReport()
    known: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        backups = known.setdefault(manifest.domain_uuid, store.backups(manifest.domain_uuid))
        for record in manifest.disks:
            check = check_disk(store, manifest, record)
            if check.ok:
                _points, missing = lineage(backups, manifest, record.disk.target)
                if missing is not None:
                    check = DiskCheck(manifest.backup_id, record.disk.target, False,
                                      f"builds on backup {missing}, which is missing")
            report.checks.append(check)
    return report


def verify(target: str, domain: str | None = None, backup_id: str | None = None,
           tls_dir: str | None = None) -> VerifyReport:
    """Verify backups at ``target`` (all, one domain's, or one backup)."""
    from libvirt_rdm_backup.engine.restore import choose_backup, find_domain_backups

    with open_store(target, tls_dir=tls_dir) as store:
        if domain is not None and backup_id is not None:
            manifests = [choose_backup(store, domain, backup_id)]
        elif domain is not None:
            manifests = find_domain_backups(store, domain)
        else:
            manifests = store.all_backups()
            if backup_id is not None:
                check_backup_id(backup_id)
                manifests = [m for m in manifests if m.backup_id == backup_id]
        if not manifests:
            raise NotFoundError(f"backup {backup_id} not found" if backup_id else "no backups")
        return verify_manifests(store, manifests)
