"""The plan: for each disk, which data path, level and parent, decided once from facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import DamagedBackupError, TrackingLostError, UsageError
from libvirt_rdm_backup.modes import Level, parse_choice
from libvirt_rdm_backup.qemu import bitmaps
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint
from libvirt_rdm_backup.repository.manifest import DiskRecord

# Agents whose snapshots serve a running VM's disk even where QEMU could copy it: the
# storage itself tells what changed (no QEMU bitmap), so incrementals survive VM restarts.
# Only into targets that take layers of ranges copied from storage (file repositories,
# rbd:// targets); into the others QEMU's own job (with its bitmap) keeps incrementals
# possible.
SNAPSHOT_FIRST_AGENTS = frozenset({"rbd"})
# the level a mixed backup reports is its most costly one
_COST = {Level.FULL: 3, Level.RESYNC: 2, Level.DIFFERENTIAL: 1, Level.INCREMENTAL: 0}


class DataPath(StrEnum):
    """How a disk's bytes reach the repository."""

    QEMU = "qemu"  # a blockdev-backup job in the running QEMU (copy-before-write)
    STORAGE = "storage"  # read from the storage side (host device or iSCSI LUN)
    SNAPSHOT = "snapshot"  # a storage snapshot taken by a storage agent, read afterwards


@dataclass(frozen=True)
class DiskPlan:
    """What will be done for one disk, and why.

    ``parent`` is the point the new layer builds on and ``source_bitmap`` the
    bitmap holding the writes since that point (both None for a full copy).
    ``track`` says whether a new bitmap starts at this backup's point.
    """

    disk: RawDisk
    path: DataPath
    level: Level
    reason: str
    parent: DiskPoint | None = None
    source_bitmap: str | None = None
    track: bool = False
    agent: str | None = None  # the storage agent taking snapshots (SNAPSHOT path)


@dataclass(frozen=True)
class Facts:
    """What is known when planning: the domain's state and the chain's history."""

    running: bool
    chain: Chain
    live_bitmaps: dict[str, set[str]]  # QEMU node name -> its bitmap names
    restart: str | None = None  # what the libvirt hook saw since the chain's last backup
    snapshot_agents: dict[str, str] = field(default_factory=dict)  # disk -> agent name
    live_snapshots: set[str] = field(default_factory=set)  # storage snapshots that still exist
    resync_layers: bool = True  # the target takes layers of chunks compared with a point
    storage_layers: bool = True  # the target takes layers of ranges copied from storage
    # disk -> {backup id: why its point cannot be built on} (damaged, or builds on damage)
    unusable: dict[str, dict[str, str]] = field(default_factory=dict)
    # a backup of the domain newer than the chain's last one whose manifest is unreadable
    damaged_newer: tuple[str, str] | None = None  # (backup id, problem)
    # the repository's id: a point's bitmap must be the one made for it in this chain
    repo_id: str | None = None
    remote: bool = False  # QEMU runs on another host (no fleecing export reaches this one)


def _resync_problem(disk: RawDisk, point: DiskPoint | None) -> str | None:
    """Why the disk cannot be compared chunk by chunk with ``point`` (None: it can): with
    the point's chunk map where it has one, else with the point read back."""
    if point is None:
        return f"no earlier backup of {disk.target}"
    return _disk_changed(disk, point.record)


def _no_resync(disk: RawDisk, point: DiskPoint | None, facts: Facts, path: DataPath
               ) -> str | None:
    """Why no resync of the disk on ``point`` can be taken here (None: it can)."""
    if not facts.resync_layers:
        return "this target cannot take chunk-compared layers"
    if facts.remote and path is DataPath.QEMU:
        return "QEMU runs on another host, whose disk cannot be read from here for a resync"
    return _resync_problem(disk, point)


def _disk_changed(disk: RawDisk, record: DiskRecord) -> str | None:
    """How the disk is not the one the point recorded (resized, another source), or None."""
    if record.size != disk.size:
        return f"{disk.target} was resized from {record.size} to {disk.size} bytes"
    if record.disk.source != disk.source:
        return f"{disk.target} now has source {disk.source} instead of {record.disk.source}"
    return None


def _tracking_problem(disk: RawDisk, point: DiskPoint | None, facts: Facts,
                      path: DataPath = DataPath.QEMU) -> str | None:
    """Why the writes since ``point`` cannot be had (None: they can).

    On the QEMU path they come from the point's dirty bitmap, on the snapshot
    path from comparing the point's storage snapshot with a new one.
    """
    if point is None:
        return f"chain {facts.chain.name} has no earlier backup of {disk.target}"
    record = point.record
    if path is DataPath.SNAPSHOT:
        snap = record.storage_snapshot
        if snap is None:
            return f"backup {point.backup_id} kept no storage snapshot of {disk.target}"
        changed = _disk_changed(disk, record)
        if changed is not None:
            return changed
        if snap.get("name") not in facts.live_snapshots:
            return (f"storage snapshot {snap.get('name')} of backup {point.backup_id} is gone "
                    "or not provably this disk's, so the storage cannot tell what changed")
        return None
    if not facts.running:
        return "the domain is not running, so QEMU tracks no writes"
    if record.bitmap is None:
        return f"backup {point.backup_id} started no dirty tracking for {disk.target}"
    changed = _disk_changed(disk, record)
    if changed is not None:
        return changed
    if facts.repo_id is not None and not bitmaps.made_for(record.bitmap, facts.repo_id,
                                                           facts.chain.name, point.backup_id):
        return (f"backup {point.backup_id} names dirty bitmap {record.bitmap!r}, not the one "
                f"chain {facts.chain.name} made for it")
    if record.bitmap not in facts.live_bitmaps.get(disk.node_name or "", set()):
        why = facts.restart or "QEMU was restarted, or the disk replaced, since then"
        return (f"dirty bitmap {record.bitmap} of backup {point.backup_id} is gone "
                f"({why}): tracking was lost")
    return None


def _damage_note(disk: str, facts: Facts) -> str | None:
    """Why the chain's newest points of ``disk`` are passed over (None: they are not)."""
    notes = []
    if facts.damaged_newer is not None:
        backup_id, problem = facts.damaged_newer
        notes.append(f"backup {backup_id} is damaged: {problem}")
    newest = facts.chain.last_point(disk)
    broken = facts.unusable.get(disk, {})
    if newest is not None and newest.backup_id in broken:
        notes.append(f"backup {newest.backup_id} of {disk} is unusable: "
                     f"{broken[newest.backup_id]}")
    return "; ".join(notes) or None


def _refuse_damaged(disk: str, level: str, point: DiskPoint | None, facts: Facts) -> None:
    """An explicit level never builds on a damaged point (nor past a damaged newer backup)."""
    if point is None:
        return
    broken = facts.unusable.get(disk, {})
    if point.backup_id in broken:
        raise DamagedBackupError(
            point.backup_id, f"unusable ({broken[point.backup_id]}), so no {level} backup "
            "can build on it; --level auto builds on the last usable backup", disk)
    if facts.damaged_newer is not None:
        backup_id, problem = facts.damaged_newer
        raise DamagedBackupError(
            backup_id, f"{problem}; no {level} backup of {disk} is taken past it; "
            "--level auto builds on the last usable backup")


def _data_path(disk: RawDisk, facts: Facts) -> DataPath:
    """Where a disk's point in time comes from; decided once, from facts."""
    agent = facts.snapshot_agents.get(disk.target)
    if agent is not None and (disk.is_passthrough_lun or not facts.running
                              or (agent in SNAPSHOT_FIRST_AGENTS and facts.storage_layers)):
        return DataPath.SNAPSHOT
    if disk.is_passthrough_lun or not facts.running:
        return DataPath.STORAGE
    return DataPath.QEMU


def plan_disk(disk: RawDisk, requested: Level | str, facts: Facts) -> DiskPlan:
    """Choose data path, level and parent of one disk."""
    level = parse_choice(Level, requested, "level")
    path = _data_path(disk, facts)
    agent = facts.snapshot_agents.get(disk.target) if path is DataPath.SNAPSHOT else None
    if path is DataPath.STORAGE and disk.is_passthrough_lun:
        return DiskPlan(
            disk, DataPath.STORAGE, Level.FULL,
            "SCSI passthrough LUN without a snapshot-capable storage agent: guest I/O "
            "bypasses QEMU's block layer, so no dirty tracking; copied in full from storage"
            + (" while the guest is paused" if facts.running else ""))
    if path is DataPath.QEMU and not disk.node_name:
        raise UsageError(f"disk {disk.target}: QEMU has no block node for it")
    track = path is not DataPath.STORAGE  # a bitmap or a storage snapshot starts here
    origin = (f"storage snapshot by agent {agent}" if agent else "")
    if level is Level.FULL:
        return DiskPlan(disk, path, Level.FULL, _join("full copy requested", origin), track=track,
                        agent=agent)
    chain = facts.chain
    broken = facts.unusable.get(disk.target, {})
    damage = _damage_note(disk.target, facts)
    last = chain.last_point(disk.target, skip=broken)  # the newest usable point
    if level in (Level.INCREMENTAL, Level.DIFFERENTIAL, Level.AUTO):
        wanted = Level.DIFFERENTIAL if level is Level.DIFFERENTIAL else Level.INCREMENTAL
        if level is not Level.AUTO:
            _refuse_damaged(disk.target, level, chain.last_full_point(disk.target)
                            if wanted is Level.DIFFERENTIAL else chain.last_point(disk.target),
                            facts)
        point = chain.last_full_point(disk.target, skip=broken) \
            if wanted is Level.DIFFERENTIAL else last
        problem = _build_problem(disk, point, facts, path)
        if problem is not None and damage is not None:
            # newer points are damaged: the last usable full may still have its tracking
            full = chain.last_full_point(disk.target, skip=broken)
            if full is not None and _build_problem(disk, full, facts, path) is None:
                point, wanted, problem = full, Level.DIFFERENTIAL, None
        if problem is None:
            assert point is not None
            usable = " usable" if damage is not None else ""
            since = f"last{usable} full" if wanted is Level.DIFFERENTIAL \
                else f"previous{usable}"
            how = ("ranges the storage reports as changed" if path is DataPath.SNAPSHOT
                   else "writes")
            return DiskPlan(disk, path, wanted,
                            _join(f"{how} since the {since} backup {point.backup_id}", damage),
                            parent=point, source_bitmap=point.record.bitmap, track=True,
                            agent=agent)
        if level is not Level.AUTO:
            raise TrackingLostError(disk.target, level, problem)
    else:
        _refuse_damaged(disk.target, level, chain.last_point(disk.target), facts)
        problem = "resync requested"
    why_not = _no_resync(disk, last, facts, path)
    if why_not is None:
        assert last is not None
        how = "reading the disk once" + {DataPath.QEMU: "", DataPath.STORAGE: " from storage",
                                         DataPath.SNAPSHOT: " from a storage snapshot"}[path]
        compared = (f"the chunks that differ from backup {last.backup_id}"
                    if last.record.chunk_map else
                    f"the chunks that differ from backup {last.backup_id} read back "
                    "(it has no chunk map)")
        return DiskPlan(disk, path, Level.RESYNC,
                        _join(f"resync: {problem}; {how}, storing {compared}", damage),
                        parent=last, track=track, agent=agent)
    if level is Level.RESYNC:
        raise TrackingLostError(disk.target, level, why_not)
    return DiskPlan(disk, path, Level.FULL, _join(f"full copy: {problem}", damage, origin),
                    track=track, agent=agent)


def _build_problem(disk: RawDisk, point: DiskPoint | None, facts: Facts,
                   path: DataPath) -> str | None:
    """Why a layer of the writes since ``point`` cannot be taken (None: it can)."""
    if point is None and facts.unusable.get(disk.target):
        return f"chain {facts.chain.name} has no usable backup of {disk.target}"
    problem = _tracking_problem(disk, point, facts, path)
    if problem is None and path is DataPath.SNAPSHOT and not facts.storage_layers:
        problem = "this target cannot take layers of ranges copied from storage"
    return problem


def _join(*parts: str | None) -> str:
    return "; ".join(p for p in parts if p)


def plan_backup(disks: list[RawDisk], level: Level | str, facts: Facts) -> list[DiskPlan]:
    """Plans for every selected disk."""
    return [plan_disk(disk, level, facts) for disk in disks]


def overall_level(plans: list[DiskPlan]) -> Level:
    """The level a backup reports: that of its block-layer disks, the most costly one."""
    considered = [p for p in plans if not p.disk.is_passthrough_lun] or plans
    return max((p.level for p in considered), key=lambda lvl: _COST.get(lvl, 3))
