"""``prune``: points of a chain dropped; the data later kept points need merged into them.

:func:`plan_merges` finds, for each disk, the kept points whose layers build on
dropped ones and picks the cheaper way to merge each (by the bytes QEMU would
copy: streaming the dropped layers' data up into the kept layer, or committing
the kept layer down into the oldest dropped one, which then takes its place).
:func:`prune_points` writes the journal and carries it out (:mod:`.consolidate`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from libvirt_rdm_backup.engine import consolidate
from libvirt_rdm_backup.engine.file_store import GATE_TIMEOUT, FileStore
from libvirt_rdm_backup.engine.prune_plan import ChainPlan, plan_chain, plan_prune, protections
from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.repository.chain import Chain, chain_of
from libvirt_rdm_backup.repository.ids import now_iso
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.prune_journal import Journal, Merge, write_journal
from libvirt_rdm_backup.repository.retention import RetentionPolicy

Ranges = list[tuple[int, int]]  # sorted, disjoint [start, end) byte ranges


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


@dataclass
class PruneResult:
    """What a prune did."""

    domain_uuid: str
    chain: str
    dropped: list[str]
    kept: list[str]
    merges: list[PlannedMerge] = field(default_factory=list)
    freed_bytes: int = 0

    @property
    def bytes_moved(self) -> int:
        return sum(m.bytes_moved for m in self.merges)


def protected(chain: Chain) -> dict[str, str]:
    """Points of the chain that are never dropped, and why."""
    why: dict[str, str] = {}
    if chain.last is not None:
        why[chain.last.backup_id] = "newest of its chain"
    for manifest in chain.backups:
        for record in manifest.disks:
            needed = {p.backup_id for p in chain.kept_points(record.disk.target)}
            if manifest.backup_id in needed and (record.bitmap or record.storage_snapshot):
                why.setdefault(manifest.backup_id, "the next backup builds on it")
    return why


Chooser = Callable[[Chain, dict[str, str]], Collection[str]]


def prune_chain(store: FileStore, domain_uuid: str, chain_name: str, choose: Chooser,
                speed: int = 0) -> PruneResult:
    """Drop the points ``choose`` picks, given the chain and the domain's unreadable
    backups (id -> problem) as they are under the domain's lock; merge their data into
    the kept points that build on them. Waits for readers of the domain's backups."""
    repo = store.repo
    with store.lock(domain_uuid), repo.prune_gate(domain_uuid, True, GATE_TIMEOUT):
        listed = store.scan(domain_uuid)
        chain = chain_of(listed.backups, chain_name)
        drop = set(choose(chain, {d.backup_id: d.problem for d in listed.damaged}))
        ids = [m.backup_id for m in chain.backups]
        unknown = sorted(drop - set(ids))
        if unknown:
            raise UsageError(f"no backup {unknown[0]} in chain {chain_name} of domain "
                             f"{domain_uuid}")
        refused = {i: why for i, why in protected(chain).items() if i in drop}
        if refused:
            first = next(iter(refused))
            raise UsageError(f"backup {first} cannot be dropped: {refused[first]}")
        result = PruneResult(domain_uuid, chain_name, [i for i in ids if i in drop],
                             [i for i in ids if i not in drop])
        if not result.dropped:
            return result
        directory = repo.domain_dir(domain_uuid)
        before = _allocated(directory)
        result.merges = plan_merges(store, chain, drop)
        journal = Journal(domain_uuid, chain_name, now_iso(), tuple(result.dropped),
                          tuple(p.merge for p in result.merges))
        write_journal(directory, journal)
        consolidate.carry_out(repo, journal, speed)
        result.freed_bytes = max(0, before - _allocated(directory))
    return result


def check_prunable(store: Store) -> FileStore:
    """The store as one prune works on (UsageError for an NBD volume)."""
    if not isinstance(store, FileStore):
        raise UsageError(f"prune: {store.name} is an NBD volume; points are pruned in file "
                         "repositories")
    return store


def prune_after_backup(store: Store, manifest: Manifest, policy: RetentionPolicy,
                       speed: int = 0) -> PruneResult:
    """``backup --prune``: the chain of the backup just published, pruned by ``policy``."""
    try:
        [(_plan, result)] = prune_by_policy(check_prunable(store), policy,
                                            manifest.domain_uuid, manifest.chain, speed)
    except RdmBackupError as err:
        err.args = (f"backup {manifest.backup_id} was published; pruning its chain failed: "
                    f"{err}",)
        raise
    return result


def prune_by_policy(store: FileStore, policy: RetentionPolicy, domain: str | None,
                    chain: str | None, speed: int = 0) -> list[tuple[ChainPlan, PruneResult]]:
    """Prune every chain :func:`.prune_plan.plan_prune` names with ``policy``; each chain's
    decisions are made again under its domain's lock, from what is there then."""
    done = []
    for listed in plan_prune(store, domain, chain, policy):
        chooser = _PolicyChooser(store, policy, listed)
        result = prune_chain(store, listed.domain_uuid, listed.chain, chooser, speed)
        done.append((chooser.decided or listed, result))
    return done


class _PolicyChooser:
    """Chooses the points to drop by the policy, and keeps the decisions it made."""

    def __init__(self, store: FileStore, policy: RetentionPolicy, listed: ChainPlan) -> None:
        self.store, self.policy, self.listed = store, policy, listed
        self.decided: ChainPlan | None = None

    def __call__(self, found: Chain, damaged: dict[str, str]) -> list[str]:
        protected = protections(self.store, self.listed.domain_uuid, found, damaged)
        self.decided = ChainPlan(self.listed.domain_uuid, self.listed.domain_name, found.name,
                                 plan_chain(found, self.policy, protected))
        return [d.backup_id for d in self.decided.dropped]


def plan_merges(store: FileStore, chain: Chain, drop: set[str]) -> list[PlannedMerge]:
    """The merges dropping ``drop`` needs, oldest kept point first, each its cheaper way."""
    found: list[tuple[Merge, Manifest]] = []
    for manifest in chain.backups:
        if manifest.backup_id in drop:
            continue
        for record in manifest.disks:
            if record.parent is None or record.parent not in drop:
                continue
            dropped: list[str] = []
            below: str | None = record.parent
            by_id = {m.backup_id: m for m in chain.backups}
            while below is not None and below in drop:
                dropped.append(below)
                point = by_id[below].disk(record.disk.target)
                below = point.parent if point is not None else None
            found.append((Merge(record.disk.target, manifest.backup_id, tuple(dropped),
                                below, "up"), manifest))
    shared = _shared(m for m, _ in found)
    first: dict[tuple[str, str], str] = {}  # shared dropped layer -> the kept point taking it
    planned = []
    for merge, manifest in found:
        costs = _costs(store, chain, merge, manifest, shared)
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


def _costs(store: FileStore, chain: Chain, merge: Merge, manifest: Manifest,
           shared: set[tuple[str, str]]) -> tuple[int, int | None]:
    """Bytes streaming up would copy, and committing down (None: not possible)."""
    by_id = {m.backup_id: m for m in chain.backups}

    def own(backup_id: str, source: Manifest) -> Ranges:
        record = source.disk(merge.disk)
        assert record is not None
        path = store.repo.data_file(source, record)
        node = layers.json_filename(layers.chain_node([layers.file_node(path)]))
        return _data_ranges(img.iter_map(node))

    kept = own(merge.kept, manifest)
    dropped = [own(i, by_id[i]) for i in merge.dropped]
    up = _length(_subtract(_union(dropped), kept))
    if any((merge.disk, i) in shared for i in merge.dropped):
        return up, None
    down = _length(_union([kept, *dropped[:-1]]))
    return up, down


def _data_ranges(extents: Iterable[img.MapExtent]) -> Ranges:
    return [(e.start, e.end) for e in extents if e.data and not e.zero and e.depth == 0]


def _union(sets: list[Ranges]) -> Ranges:
    merged: Ranges = []
    for start, end in sorted(r for ranges in sets for r in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _subtract(ranges: Ranges, minus: Ranges) -> Ranges:
    out: Ranges = []
    for start, end in ranges:
        for cut_start, cut_end in minus:
            if cut_end <= start or cut_start >= end:
                continue
            if cut_start > start:
                out.append((start, cut_start))
            start = max(start, cut_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def _length(ranges: Ranges) -> int:
    return sum(end - start for start, end in ranges)


def _allocated(directory: str) -> int:
    """Bytes the files under ``directory`` take on disk."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total
