"""Full backup: discover → map → plan → capture → publish."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import libvirt

from libvirt_rdm_backup.engine.capture import DATA_FORMAT, ProgressCallback, capture
from libvirt_rdm_backup.engine.discover import open_domain, select_disks
from libvirt_rdm_backup.engine.plan import plan_backup
from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository, new_backup_id, now_iso
from libvirt_rdm_backup.storage import map_disk
from libvirt_rdm_backup.storage.base import RawDiskMapping

log = logging.getLogger(__name__)


@dataclass
class BackupResult:
    """What a finished backup reports."""

    manifest: Manifest
    path: str

    def to_dict(self) -> dict[str, Any]:
        """The ``backup --json`` document."""
        m = self.manifest
        return {
            "backup_id": m.backup_id,
            "domain_uuid": m.domain_uuid,
            "domain_name": m.domain_name,
            "level": m.level,
            "chain": m.chain,
            "created": m.created,
            "completed": m.completed,
            "consistency": m.consistency,
            "path": self.path,
            "disks": [
                {
                    "disk": d.disk.target,
                    "size": d.size,
                    "bytes_transferred": d.bytes_transferred,
                    "stored_bytes": d.stored_bytes,
                    "level": d.level,
                    "reason": d.reason,
                    "data_path": d.data_path,
                    "data_file": d.data_file,
                    "digest": d.digest.to_dict(),
                }
                for d in m.disks
            ],
        }


def _mapping_of(disk: Any) -> tuple[RawDiskMapping | None, str | None]:
    try:
        return map_disk(disk), None
    except RdmBackupError as err:
        log.warning("disk %s: no raw disk mapping: %s", disk.target, err)
        return None, str(err)


def backup(
    conn: libvirt.virConnect,
    domain: str,
    target: str,
    disks: list[str] | None = None,
    progress: ProgressCallback | None = None,
) -> BackupResult:
    """Take a full, point-in-time backup of a domain's raw disks into ``target``."""
    ctx = open_domain(conn, domain)
    selected = select_disks(ctx.inventory, disks)
    mappings = {disk.target: _mapping_of(disk) for disk in selected}
    plans = plan_backup(selected, ctx.inventory.running)
    repo = Repository.open(target, create=True)
    backup_id = new_backup_id()
    created = now_iso()
    with repo.lock(ctx.uuid), repo.staging(ctx.uuid, backup_id) as staging:
        captured = capture(ctx.dom, ctx.inventory.running, plans, staging, progress)
        records = []
        for plan in plans:
            path = captured.files[plan.disk.target]
            mapping, mapping_error = mappings[plan.disk.target]
            records.append(
                DiskRecord(
                    disk=plan.disk,
                    size=int(plan.disk.size or img.virtual_size(path, DATA_FORMAT)),
                    data_file=os.path.basename(path),
                    format=DATA_FORMAT,
                    digest=file_digest(path),
                    level=plan.level,
                    reason=plan.reason,
                    data_path=str(plan.path),
                    bytes_transferred=img.data_bytes(path, DATA_FORMAT),
                    stored_bytes=os.stat(path).st_blocks * 512,
                    mapping=mapping,
                    mapping_error=mapping_error,
                )
            )
        manifest = Manifest(
            backup_id=backup_id,
            domain_uuid=ctx.uuid,
            domain_name=ctx.name,
            level="full",
            created=created,
            completed=now_iso(),
            consistency={
                "method": captured.window.method,
                "paused_ms": round(captured.window.paused_ms, 1),
            },
            domain_xml=ctx.xml_text,
            disks=records,
        )
        path = repo.publish(staging, manifest)
    return BackupResult(manifest=manifest, path=path)
