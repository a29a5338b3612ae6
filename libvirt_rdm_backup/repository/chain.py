"""Chains: the backups of one domain under one chain name, and what each disk builds on."""

from __future__ import annotations

import os
from dataclasses import dataclass

from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest

DEFAULT_CHAIN = "default"


@dataclass(frozen=True)
class DiskPoint:
    """One published point of one disk: the manifest and the disk's record in it."""

    manifest: Manifest
    record: DiskRecord

    @property
    def backup_id(self) -> str:
        """Id of the backup holding this point."""
        return self.manifest.backup_id

    def relative_data_file(self) -> str:
        """The data file as seen from a sibling backup directory (for backing files)."""
        return os.path.join("..", self.manifest.backup_id, self.record.data_file)


@dataclass
class Chain:
    """The published backups of one chain of one domain, oldest first."""

    name: str
    backups: list[Manifest]

    @property
    def last(self) -> Manifest | None:
        """The newest backup of the chain."""
        return self.backups[-1] if self.backups else None

    def last_point(self, disk: str) -> DiskPoint | None:
        """The newest point of ``disk`` in the chain."""
        for manifest in reversed(self.backups):
            record = manifest.disk(disk)
            if record is not None:
                return DiskPoint(manifest, record)
        return None

    def last_full_point(self, disk: str) -> DiskPoint | None:
        """The newest point of ``disk`` that is a full copy (the base of differentials)."""
        for manifest in reversed(self.backups):
            record = manifest.disk(disk)
            if record is not None and record.level == "full":
                return DiskPoint(manifest, record)
        return None

    def kept_points(self, disk: str) -> list[DiskPoint]:
        """The points later backups of ``disk`` build on: the newest and the newest full."""
        points = [self.last_point(disk), self.last_full_point(disk)]
        return [p for p in points if p is not None]

    def _kept_records(self) -> list[DiskRecord]:
        disks = {d.disk.target for m in self.backups for d in m.disks}
        return [p.record for disk in disks for p in self.kept_points(disk)]

    def needed_snapshots(self) -> set[str]:
        """Storage snapshots later backups may still compare with (last and last full)."""
        return {str(r.storage_snapshot.get("name"))
                for r in self._kept_records() if r.storage_snapshot}

    def needed_bitmaps(self) -> set[str]:
        """Bitmaps that later backups of the chain may still use (last and last full)."""
        return {r.bitmap for r in self._kept_records() if r.bitmap}


def chain_of(backups: list[Manifest], name: str) -> Chain:
    """The chain ``name`` out of all backups of a domain (oldest first)."""
    return Chain(name, [m for m in backups if m.chain == name])


def lineage(backups: list[Manifest], manifest: Manifest, disk: str
            ) -> tuple[list[DiskPoint], str | None]:
    """The layers a disk's point is built from, itself first, down to its full copy.

    The second value names a parent backup that is missing (a broken chain), or is None.
    """
    by_id = {m.backup_id: m for m in backups}
    points: list[DiskPoint] = []
    current: Manifest | None = manifest
    while current is not None:
        record = current.disk(disk)
        if record is None:
            return points, current.backup_id
        points.append(DiskPoint(current, record))
        if record.parent is None:
            return points, None
        if record.parent in {p.backup_id for p in points}:
            return points, record.parent  # a loop: treat as broken
        current = by_id.get(record.parent)
        if current is None:
            return points, record.parent
    return points, None
