"""``prune``: points of a chain dropped; the data later kept points need merged into them.

:func:`prune_chain` decides under the domain's lock (never the newest point, nor one the
next backup builds on) and lets the store merge (:meth:`.stores.Store.consolidate`: a
file repository through its journal, :mod:`.consolidate`; an NBD volume into fresh
regions, published in one write); :func:`prune_by_policy` does it by retention rules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from libvirt_rdm_backup.engine.merge_plan import PlannedMerge, find_merges
from libvirt_rdm_backup.engine.prune_plan import ChainPlan, plan_chain, plan_prune, protections
from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.errors import RdmBackupError, RepositoryError, UsageError
from libvirt_rdm_backup.repository.chain import Chain, chain_of, lineage
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.retention import RetentionPolicy


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


def protected(chain: Chain, self_contained: bool = False) -> dict[str, str]:
    """Points of the chain that are never dropped, and why (``self_contained``: the
    store's points are complete images; later backups build on the newest one only)."""
    why: dict[str, str] = {}
    if chain.last is not None:
        why[chain.last.backup_id] = "newest of its chain"
    for manifest in chain.backups:
        for record in manifest.disks:
            kept = chain.kept_points(record.disk.target)
            needed = {p.backup_id for p in (kept[:1] if self_contained else kept)}
            if manifest.backup_id in needed and (record.bitmap or record.storage_snapshot):
                why.setdefault(manifest.backup_id, "the next backup builds on it")
    return why


Chooser = Callable[[Chain, dict[str, str]], Collection[str]]


def prune_chain(store: Store, domain_uuid: str, chain_name: str, choose: Chooser,
                speed: int = 0) -> PruneResult:
    """Drop the points ``choose`` picks, given the chain and the domain's unreadable
    backups (id -> problem) as they are under the domain's lock; the store merges their
    data into the kept points that build on them (:meth:`.stores.Store.consolidate`)."""
    with store.lock(domain_uuid):
        listed = store.scan(domain_uuid)
        chain = chain_of(listed.backups, chain_name)
        drop = set(choose(chain, {d.backup_id: d.problem for d in listed.damaged}))
        ids = [m.backup_id for m in chain.backups]
        unknown = sorted(drop - set(ids))
        if unknown:
            raise UsageError(f"no backup {unknown[0]} in chain {chain_name} of domain "
                             f"{domain_uuid}")
        refused = {i: why for i, why in protected(chain, store.self_contained).items() if i in drop}
        if refused:
            first = next(iter(refused))
            raise UsageError(f"backup {first} cannot be dropped: {refused[first]}")
        if listed.damaged:
            raise RepositoryError(f"backup {listed.damaged[0].backup_id} of domain "
                                  f"{domain_uuid} cannot be read: what builds on what is not "
                                  "known; nothing was dropped")
        result = PruneResult(domain_uuid, chain_name, [i for i in ids if i in drop],
                             [i for i in ids if i not in drop])
        if result.dropped:
            _check_data(store, chain, drop)
            result.merges, result.freed_bytes = store.consolidate(domain_uuid, chain, drop,
                                                                  speed)
    return result


def _check_data(store: Store, chain: Chain, drop: set[str]) -> None:
    """Every layer a merge reads is what its digests say (no damage merged into a kept
    point, where it would get a new digest of its own)."""
    by_id = {m.backup_id: m for m in chain.backups}
    seen: set[tuple[str, str]] = set()
    for merge in find_merges(chain, drop):
        for point in lineage(chain.backups, by_id[merge.kept], merge.disk)[0]:
            if (point.backup_id, merge.disk) in seen:
                continue
            seen.add((point.backup_id, merge.disk))
            problem = store.damage(point, digests=True)
            if problem is not None:
                raise RepositoryError(f"backup {point.backup_id}, disk {merge.disk}: "
                                      f"{problem}; nothing was dropped")


def prune_after_backup(store: Store, manifest: Manifest, policy: RetentionPolicy,
                       speed: int = 0) -> PruneResult:
    """``backup --prune``: the chain of the backup just published, pruned by ``policy``."""
    try:
        [(_plan, result)] = prune_by_policy(store, policy, manifest.domain_uuid,
                                            manifest.chain, speed)
    except RdmBackupError as err:
        err.args = (f"backup {manifest.backup_id} was published; pruning its chain failed: "
                    f"{err}",)
        raise
    return result


def prune_by_policy(store: Store, policy: RetentionPolicy, domain: str | None,
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

    def __init__(self, store: Store, policy: RetentionPolicy, listed: ChainPlan) -> None:
        self.store, self.policy, self.listed = store, policy, listed
        self.decided: ChainPlan | None = None

    def __call__(self, found: Chain, damaged: dict[str, str]) -> list[str]:
        protected = protections(self.store, self.listed.domain_uuid, found, damaged)
        self.decided = ChainPlan(self.listed.domain_uuid, self.listed.domain_name, found.name,
                                 plan_chain(found, self.policy, protected))
        return [d.backup_id for d in self.decided.dropped]
