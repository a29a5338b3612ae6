"""Chains: the backups of one domain under one chain name, and what each disk builds on."""

from __future__ import annotations

import os
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.order import in_order

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
    """The published backups of one chain of one domain, oldest first.

    Oldest first by parent links and sequence (:func:`.order.in_order`): ``last``
    and the last points are the newest whatever the clocks said.
    """

    name: str
    backups: list[Manifest]

    @property
    def last(self) -> Manifest | None:
        """The newest backup of the chain."""
        return self.backups[-1] if self.backups else None

    def last_point(self, disk: str, skip: Container[str] = ()) -> DiskPoint | None:
        """The newest point of ``disk`` in the chain (not one of the backups in ``skip``)."""
        for manifest in reversed(self.backups):
            record = manifest.disk(disk)
            if record is not None and manifest.backup_id not in skip:
                return DiskPoint(manifest, record)
        return None

    def last_full_point(self, disk: str, skip: Container[str] = ()) -> DiskPoint | None:
        """The newest point of ``disk`` that is a full copy (the base of differentials)."""
        for manifest in reversed(self.backups):
            record = manifest.disk(disk)
            if (record is not None and record.level == "full"
                    and manifest.backup_id not in skip):
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
    """The chain ``name`` out of all backups of a domain, oldest first (:func:`.order.in_order`)."""
    return Chain(name, in_order(m for m in backups if m.chain == name))


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


def unusable_points(backups: list[Manifest], disk: str,
                    problem_of: Callable[[DiskPoint], str | None],
                    damaged: Mapping[str, str]) -> dict[str, str]:
    """Why points of ``disk`` cannot be restored or built on, by backup id.

    A point is unusable when ``problem_of`` finds something wrong with its own
    layer, or when a layer it builds on is unusable, missing, or in a backup
    whose manifest is unreadable (``damaged``: backup id -> problem). The reason
    of a point that builds on an unusable one names the root cause.
    """
    seen: set[str] = set()
    why: dict[str, str] = {}
    for manifest in backups:  # oldest first: a parent is decided before its children
        record = manifest.disk(disk)
        if record is None:
            continue
        point = DiskPoint(manifest, record)
        problem = problem_of(point)
        parent = record.parent
        if problem is None and parent is not None:
            if parent in damaged:
                problem = f"builds on backup {parent}, which is damaged: {damaged[parent]}"
            elif parent not in seen:
                problem = f"builds on backup {parent}, which is missing"
            elif parent in why:
                problem = why[parent] if why[parent].startswith("builds on") else (
                    f"builds on backup {parent}, which is damaged: {why[parent]}")
        seen.add(manifest.backup_id)
        if problem is not None:
            why[manifest.backup_id] = problem
    return why
