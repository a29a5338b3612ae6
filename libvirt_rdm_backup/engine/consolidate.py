"""Consolidation in a file repository: dropped points' data merged into the points kept.

A prune first writes its journal (:mod:`..repository.prune_journal`), then carries it
out here, step by step, each step one that may be done again:

1. each merge brings a kept point's layer to what it reads, without the dropped
   layers below it (``up``: QEMU streams their data into it; ``down``: QEMU commits
   it into the oldest dropped layer, which is then renamed onto it);
2. the kept point's manifest is written again: parent, backing file, level, and
   the layer's digest, size and stored bytes (what the disk reads, and so its chunk
   map, does not change);
3. the dropped points' directories are renamed out of the listing and removed;
4. the journal goes.

What a kept point reads never changes on the way, so a prune killed at any moment
leaves every kept point's data in place; the next command that reads or writes the
domain's backups finishes the journal (:func:`finish`) before it looks at them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace

from libvirt_rdm_backup.engine.sinks import DATA_FORMAT
from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.fileutil import fsync_dir
from libvirt_rdm_backup.qemu import layers
from libvirt_rdm_backup.qemu.layer_jobs import commit_into, rebase_name, rebase_onto, stream_into
from libvirt_rdm_backup.repository.chain import DiskPoint, lineage
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.ids import check_backup_id, check_safe_name
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.prune_journal import (
    Journal,
    Merge,
    check_against,
    read_journal,
    remove_journal,
)
from libvirt_rdm_backup.repository.store import MANIFEST, Repository, write_file_atomic

log = logging.getLogger(__name__)

LAYER_SUFFIX = f".{DATA_FORMAT}"
PRUNED_PREFIX = ".pruned-"
_LEVEL_COST = {"full": 3, "resync": 2, "differential": 1, "incremental": 0}


def backing_name(parent: str | None, disk: str) -> str | None:
    """The backing file name of a layer in a file repository: its parent's layer as the
    layout places it (``../<parent id>/<disk>.qcow2``), or none for a full copy."""
    if parent is None:
        return None
    return os.path.join("..", check_backup_id(parent),
                        check_safe_name(disk, "disk name") + LAYER_SUFFIX)


@dataclass(frozen=True)
class _Paths:
    """The files one merge works on."""

    kept: str
    dropped: list[str]  # newest first
    base: list[str]  # the base point's layers, top first (empty: none)
    size: int
    base_points: list[DiskPoint]  # the points of ``base``


def finish(repo: Repository, domain_uuid: str, speed: int = 0) -> Journal | None:
    """Carry out the domain's prune journal, if one was left; returns it (None: none).

    The caller holds the domain's lock and the prune gate exclusively.
    """
    directory = repo.domain_dir(domain_uuid)
    journal = read_journal(directory)
    if journal is None:
        return None
    if journal.domain_uuid != domain_uuid:
        raise RepositoryError(f"the prune journal in {directory} names another domain")
    log.info("finishing the prune of domain %s begun %s", domain_uuid, journal.created)
    carry_out(repo, journal, speed)
    return journal


def check(repo: Repository, journal: Journal) -> None:
    """The journal fits the domain's manifests as they are (RepositoryError if not)."""
    listed = repo.scan(journal.domain_uuid)
    check_against(journal, listed.backups, [d.backup_id for d in listed.damaged])


def carry_out(repo: Repository, journal: Journal, speed: int = 0) -> None:
    """Do every step of the journal that is not done yet (see the module); the journal is
    checked against the manifests first."""
    uuid = journal.domain_uuid
    check(repo, journal)
    for kept in dict.fromkeys(m.kept for m in journal.merges):
        merges = [m for m in journal.merges if m.kept == kept]
        manifest = repo.load(uuid, kept)
        records = [_merged(repo, manifest, m, speed) for m in merges]
        _republish(repo, manifest, records, journal)
    _repoint_parents(repo, journal)
    _check_nothing_builds_on_dropped(repo, journal)
    for backup_id in journal.drop:
        _remove_point(repo, uuid, backup_id)
    remove_journal(repo.domain_dir(uuid))


def check_layers(repo: Repository, journal: Journal) -> None:
    """Every layer the journal's merges open names what the manifests imply."""
    for merge in journal.merges:
        manifest = repo.load(journal.domain_uuid, merge.kept)
        record = manifest.disk(merge.disk)
        if record is None or record.parent == merge.base:
            continue
        paths = _paths(repo, manifest, record, merge)
        lowest = merge.base
        if merge.direction == "rebase":
            old = _old_base(repo, journal.domain_uuid, merge)
            lowest = old.backup_id if old is not None else None
        _check_layers(paths, merge, record, lowest, backing_name(merge.base, merge.disk),
                      rebasing=merge.direction == "rebase")


def abandon(repo: Repository, journal: Journal) -> None:
    """Give up a prune that failed in this run: each kept layer is published as it is
    (merged, or as before with its new digest: what it reads never changed), the dropped
    points stay (a layer committed into is marked damaged), and the journal goes."""
    uuid = journal.domain_uuid
    for kept in dict.fromkeys(m.kept for m in journal.merges):
        manifest = repo.load(uuid, kept)
        records = [r for m in journal.merges if m.kept == kept
                   if (r := _as_it_is(repo, manifest, m)) is not None]
        _republish(repo, manifest, records, Journal(uuid, journal.chain, journal.created,
                                                    (), ()))
    remove_journal(repo.domain_dir(uuid))


def _as_it_is(repo: Repository, manifest: Manifest, merge: Merge) -> DiskRecord | None:
    """The record of a kept layer a failed merge may have written into, as it is now."""
    record = manifest.disk(merge.disk)
    if record is None or record.parent == merge.base:
        return None
    paths = _paths(repo, manifest, record, merge)
    final = backing_name(merge.base, merge.disk)
    if merge.direction == "down" and os.path.lexists(paths.dropped[-1]):
        bottom = repo.load(manifest.domain_uuid, merge.dropped[-1])
        repo.set_damage_mark(bottom, merge.disk, f"a prune committed {merge.kept} into it "
                             "and did not finish; it is not restorable")
        return None
    if merge.direction == "rebase" and paths.base and _file_problem(record,
            paths.kept, paths.base[0], record.size) is None:
        rebase_name(paths.kept, str(final))
    if _file_problem(record, paths.kept, final, record.size) is None:
        parent, name = merge.base, final  # the merge ended: its data is in place
    elif _file_problem(record, paths.kept, record.backing_file, record.size) is None:
        parent, name = record.parent, record.backing_file
    else:
        return None
    _sync(paths.kept)
    stat = os.stat(paths.kept)
    return replace(record, parent=parent, backing_file=name,
                   level="full" if parent is None else record.level,
                   digest=file_digest(paths.kept, record.digest.algorithm),
                   file_size=stat.st_size, stored_bytes=stat.st_blocks * 512)


def _file_problem(record: DiskRecord, path: str, backing: str | None, size: int
                  ) -> str | None:
    """:func:`.layers.file_problem` of a layer of the chain of ``record``'s disk (encrypted
    or not as that record: a prune merges only chains whose layers are all one or the
    other, see :meth:`.file_store.FileStore.consolidate`)."""
    return layers.file_problem(path, backing, size, record.encryption is not None)


def _check_nothing_builds_on_dropped(repo: Repository, journal: Journal) -> None:
    """Before anything is removed: no point that stays builds on a dropped one, and none
    of the dropped ones is the newest of its chain (what the journal says is not trusted)."""
    dropped = set(journal.drop)
    backups = repo.scan(journal.domain_uuid).backups
    newest: dict[str, str] = {}
    for manifest in backups:  # oldest first: the last one of each chain stays
        newest[manifest.chain] = manifest.backup_id
    for manifest in backups:
        if manifest.backup_id in dropped:
            if newest[manifest.chain] == manifest.backup_id:
                raise RepositoryError(f"prune journal drops backup {manifest.backup_id}, the "
                                      "newest of its chain; nothing was removed")
            continue
        for record in manifest.disks:
            if record.parent in dropped:
                raise RepositoryError(
                    f"prune journal drops backup {record.parent}, which backup "
                    f"{manifest.backup_id} still builds on; nothing was removed")


def _merged(repo: Repository, manifest: Manifest, merge: Merge, speed: int) -> DiskRecord:
    """Bring the kept layer of one merge to its final state; its new record."""
    record = manifest.disk(merge.disk)
    if record is None:
        raise RepositoryError(f"prune journal: backup {merge.kept} has no disk {merge.disk}")
    final = backing_name(merge.base, merge.disk)
    if record.parent == merge.base:
        return record  # this merge was done and published
    paths = _paths(repo, manifest, record, merge)
    label = f"{merge.disk} of {merge.kept}"
    # Every merge is done again from the layers as the manifests place them (a header
    # naming the new base is no proof: QEMU writes it before the layer's tables)
    if merge.direction == "up":
        _check_layers(paths, merge, record, merge.base, final)
        stream_into(paths.kept, paths.dropped, paths.base, final, merge.disk, speed)
    elif merge.direction == "rebase":
        old = _old_base(repo, manifest.domain_uuid, merge)
        _check_layers(paths, merge, record, old.backup_id if old else None, final,
                      rebasing=True)
        old_below, old_points = (_lineage(repo, manifest.domain_uuid, old, merge.disk)
                                 if old else ([], []))
        for path, point in zip(old_below, old_points, strict=True):
            problem = _file_problem(record, path,
                                    backing_name(point.record.parent, merge.disk), record.size)
            if problem is not None:
                raise RepositoryError(f"cannot merge into {label}: the layer of "
                                      f"{point.backup_id} {problem}")
        assert final is not None and paths.base
        rebase_onto(paths.kept, [*paths.dropped, *old_below], paths.base[0], final)
    elif os.path.lexists(paths.dropped[-1]):  # down, the merged layer not renamed yet
        _check_layers(paths, merge, record, merge.base, None)
        bottom = paths.dropped[-1]
        commit_into(paths.kept, paths.dropped[:-1], bottom, paths.base, paths.size,
                    merge.disk, speed)
        _sync(bottom)
        os.rename(bottom, paths.kept)  # the merged layer takes the kept layer's place
        fsync_dir(os.path.dirname(paths.kept))
        fsync_dir(os.path.dirname(bottom))
    problem = _file_problem(record, paths.kept, final, record.size)
    if problem is not None:
        raise RepositoryError(f"merging into {label}: the layer {problem}")
    _sync(paths.kept)
    stat = os.stat(paths.kept)
    return replace(record, parent=merge.base, backing_file=final,
                   level="full" if merge.base is None else record.level,
                   digest=file_digest(paths.kept, record.digest.algorithm),
                   file_size=stat.st_size, stored_bytes=stat.st_blocks * 512)


def _old_base(repo: Repository, domain_uuid: str, merge: Merge) -> Manifest | None:
    """The point the oldest dropped layer of a rebase builds on (its own parent link)."""
    oldest = repo.load(domain_uuid, merge.dropped[-1]).disk(merge.disk)
    if oldest is None:
        raise RepositoryError(f"backup {merge.dropped[-1]} has no disk {merge.disk}")
    return None if oldest.parent is None else repo.load(domain_uuid, oldest.parent)


def _lineage(repo: Repository, domain_uuid: str, top: Manifest, disk: str
             ) -> tuple[list[str], list[DiskPoint]]:
    """The layer files of a point's lineage (itself first) and its points."""
    backups = repo.scan(domain_uuid).backups
    points, missing = lineage(backups, top, disk)
    if missing is not None:
        raise RepositoryError(f"backup {top.backup_id} builds on {missing}, which is missing")
    return [repo.data_file(p.manifest, p.record) for p in points], points


def _paths(repo: Repository, manifest: Manifest, record: DiskRecord, merge: Merge) -> _Paths:
    """The files of a merge, as the layout places them (ids and names checked)."""
    directory = repo.domain_dir(manifest.domain_uuid)
    layer = check_safe_name(merge.disk, "disk name") + LAYER_SUFFIX
    dropped = [os.path.join(directory, check_backup_id(i), layer) for i in merge.dropped]
    base: list[str] = []
    points: list[DiskPoint] = []
    if merge.base is not None:
        base, points = _lineage(repo, manifest.domain_uuid,
                                repo.load(manifest.domain_uuid, merge.base), merge.disk)
    return _Paths(repo.data_file(manifest, record), dropped, base, record.size, points)


def _check_layers(paths: _Paths, merge: Merge, record: DiskRecord,
                  lowest_parent: str | None, final: str | None, rebasing: bool = False) -> None:
    """Every layer QEMU opens for the merge names the backing file the chain implies
    (``lowest_parent``: that of the oldest dropped layer); the kept layer may name its
    old parent or, a merge cut short, ``final`` (a rebase: also the new base's path)."""
    kept = [backing_name(merge.dropped[0], merge.disk), final]
    if rebasing and paths.base:
        kept.append(paths.base[0])
    if all(_file_problem(record, paths.kept, name, record.size) for name in kept):
        raise RepositoryError(f"cannot merge into {merge.disk} of {merge.kept}: its layer "
                              f"{_file_problem(record, paths.kept, kept[0], record.size)}")
    chain = [*merge.dropped, *(p.backup_id for p in paths.base_points)]
    below = [*merge.dropped[1:], lowest_parent, *(p.record.parent for p in paths.base_points)]
    for path, above, parent in zip([*paths.dropped, *paths.base], chain, below, strict=True):
        problem = _file_problem(record, path, backing_name(parent, merge.disk), record.size)
        if problem is not None:
            raise RepositoryError(f"cannot merge into {merge.disk} of {merge.kept}: the "
                                  f"layer of {above} {problem}")


def _republish(repo: Repository, manifest: Manifest, records: Sequence[DiskRecord],
               journal: Journal) -> None:
    """Write the kept point's manifest again with its merged disks (atomically)."""
    backups = {m.backup_id: m for m in repo.scan(manifest.domain_uuid).backups}
    updated = merged_manifest(manifest, records, set(journal.drop), backups)
    if updated is not None:
        path = os.path.join(repo.backup_dir(manifest.domain_uuid, manifest.backup_id),
                            MANIFEST)
        write_file_atomic(path, updated.dumps())


def _repoint_parents(repo: Repository, journal: Journal) -> None:
    """Kept backups whose previous backup of the chain is dropped name the one before it
    that stays (their layers did not change)."""
    dropped = set(journal.drop)
    backups = {m.backup_id: m for m in repo.scan(journal.domain_uuid).backups}
    for manifest in backups.values():
        if manifest.backup_id in dropped or manifest.parent not in dropped:
            continue
        parent: str | None = manifest.parent
        while parent is not None and parent in dropped:
            above = backups.get(parent)
            parent = above.parent if above is not None else None
        path = os.path.join(repo.backup_dir(journal.domain_uuid, manifest.backup_id),
                            MANIFEST)
        write_file_atomic(path, replace(manifest, parent=parent).dumps())


def merged_manifest(manifest: Manifest, records: Sequence[DiskRecord], dropped: set[str],
                    backups: dict[str, Manifest]) -> Manifest | None:
    """A kept point's manifest with its merged disk ``records`` (None: nothing changes):
    its parent the previous backup of the chain that stays, its level that of its disks."""
    new = {r.disk.target: r for r in records}
    disks = [new.get(d.disk.target, d) for d in manifest.disks]
    if disks == manifest.disks:
        return None
    parent = manifest.parent
    while parent is not None and parent in dropped:  # the previous backup that stays
        above = backups.get(parent)
        parent = above.parent if above is not None else None
    level = max((d.level for d in disks), key=lambda lvl: _LEVEL_COST.get(lvl, 3))
    return replace(manifest, disks=disks, parent=parent, level=level)


def _remove_point(repo: Repository, domain_uuid: str, backup_id: str) -> None:
    """A dropped point leaves the listing at once (renamed), then its files go."""
    directory = repo.domain_dir(domain_uuid)
    path = os.path.join(directory, check_backup_id(backup_id))
    gone = os.path.join(directory, PRUNED_PREFIX + backup_id)
    if os.path.isdir(path):
        if os.path.islink(gone):
            os.unlink(gone)  # nothing the tool made: a rename onto it would fail
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(path, gone)
        fsync_dir(directory)
    shutil.rmtree(gone, ignore_errors=True)


def remove_pruned(directory: str) -> None:
    """Remove what killed prunes left of dropped points (under the domain's lock)."""
    for name in os.listdir(directory):
        if name.startswith(PRUNED_PREFIX):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
