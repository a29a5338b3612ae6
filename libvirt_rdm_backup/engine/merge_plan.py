"""Which merges dropping points needs, and the cheaper way of each (in a file repository).

:func:`find_merges` finds, for each disk, the kept points whose layers build on dropped
ones (any store). :func:`plan_file_merges` picks the way each is done in a file
repository, by the bytes QEMU would copy: streaming the dropped layers' data up into the
kept layer, committing the kept layer down into the oldest dropped one (which then takes
its place), or, for dropped layers another kept point took in, a rebase onto that point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.prune_journal import Merge
from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.targets.volume_space import Region, normalize, subtract, total


@dataclass(frozen=True)
class PlannedMerge:
    """A merge and the bytes each way would copy."""

    merge: Merge
    bytes_up: int
    bytes_down: int | None  # None: the dropped layers are needed by another kept point

    @property
    def bytes_moved(self) -> int:
        """The bytes the chosen way copies (a rebase: at most those of its dropped layers)."""
        return int(self.bytes_down or 0) if self.merge.direction == "down" else self.bytes_up


def find_merges(chain: Chain, drop: set[str]) -> list[Merge]:
    """The merges dropping ``drop`` needs (each ``up``), oldest kept point first."""
    by_id = {m.backup_id: m for m in chain.backups}
    found: list[Merge] = []
    for manifest in chain.backups:
        if manifest.backup_id in drop:
            continue
        for record in manifest.disks:
            if record.parent is None or record.parent not in drop:
                continue
            dropped: list[str] = []
            below: str | None = record.parent
            while below is not None and below in drop:
                dropped.append(below)
                point = by_id[below].disk(record.disk.target)
                below = point.parent if point is not None else None
            found.append(Merge(record.disk.target, manifest.backup_id, tuple(dropped), below,
                               "up"))
    return found


def plan_file_merges(repo: Repository, chain: Chain, drop: set[str]) -> list[PlannedMerge]:
    """The merges dropping ``drop`` needs in a file repository, each its cheaper way."""
    found = find_merges(chain, drop)
    by_id = {m.backup_id: m for m in chain.backups}
    shared = _shared(found)
    first: dict[tuple[str, str], str] = {}  # shared dropped layer -> the kept point taking it
    planned = []
    for merge in found:
        costs = _costs(repo, by_id, merge, shared)
        taken = [first[(merge.disk, i)] for i in merge.dropped if (merge.disk, i) in first]
        if taken:  # another kept point took the shared layers in: read them from it
            planned.append(PlannedMerge(Merge(merge.disk, merge.kept, merge.dropped, taken[0],
                                              "rebase"), costs[0], None))
            continue
        for backup_id in merge.dropped:
            first.setdefault((merge.disk, backup_id), merge.kept)
        direction = "down" if costs[1] is not None and costs[1] < costs[0] else "up"
        planned.append(PlannedMerge(Merge(merge.disk, merge.kept, merge.dropped, merge.base,
                                          direction), *costs))
    return planned


def _shared(merges: Iterable[Merge]) -> set[tuple[str, str]]:
    """(disk, backup id) of dropped layers that more than one kept point builds on."""
    seen: set[tuple[str, str]] = set()
    shared: set[tuple[str, str]] = set()
    for merge in merges:
        for backup_id in merge.dropped:
            key = (merge.disk, backup_id)
            (shared if key in seen else seen).add(key)
    return shared


def _costs(repo: Repository, by_id: dict[str, Manifest], merge: Merge,
           shared: set[tuple[str, str]]) -> tuple[int, int | None]:
    """Bytes streaming up would copy, and committing down (None: not possible)."""
    kept = own_data(repo, by_id[merge.kept], merge.disk)
    dropped = [own_data(repo, by_id[i], merge.disk) for i in merge.dropped]  # newest first
    up = total(subtract([r for layer in dropped for r in layer], kept))
    if any((merge.disk, i) in shared for i in merge.dropped):
        return up, None
    return up, total(normalize([*kept, *(r for layer in dropped[:-1] for r in layer)]))


def check_merge_keys(check_key: Callable[[DiskPoint], None], chain: Chain) -> None:
    """Before a prune merges anything: the key of every encrypted point (``check_key``
    raises UsageError), and no disk whose chain mixes plain and encrypted layers (a merge
    would write one into the other)."""
    kinds: dict[str, set[bool]] = {}
    for manifest in chain.backups:
        for record in manifest.disks:
            check_key(DiskPoint(manifest, record))
            kinds.setdefault(record.disk.target, set()).add(record.encryption is not None)
    for disk, found in sorted(kinds.items()):
        if len(found) > 1:
            raise UsageError(f"disk {disk} of chain {chain.name} has plain and encrypted "
                             "points: a prune does not merge them (take an encrypted full "
                             "backup; the plain points can then be pruned alone)")


def own_data(repo: Repository, manifest: Manifest, disk: str) -> list[Region]:
    """The (offset, length) byte ranges a point's layer holds data for itself (its backing
    files not opened)."""
    record = manifest.disk(disk)
    assert record is not None
    node = layers.chain_node([layers.file_node(repo.data_file(manifest, record))],
                             [record.encryption is not None])
    return [(e.start, e.length) for e in img.iter_map(layers.json_filename(node))
            if e.data and not e.zero and e.depth == 0]
