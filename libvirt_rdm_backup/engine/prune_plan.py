"""Prune planning: per chain, which points the retention rules keep and which must stay.

The rules (:mod:`..repository.retention`) say what a policy keeps; some points
stay whatever they say, each with its reason: the newest point of the chain,
the points the chain's next backup builds on (per disk: its newest point, for
an incremental or a resync, and its newest full copy, for a differential; where
newer points are damaged, also the newest usable ones), and the points another
running command serves. A point whose creation time cannot be read stays too.
Nothing is changed here: the plan is what ``prune`` removes, or shows with
``--dry-run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from libvirt_rdm_backup.engine.selection import find_domain_backups
from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.errors import NotFoundError
from libvirt_rdm_backup.repository.chain import Chain, chain_of, unusable_points
from libvirt_rdm_backup.repository.ids import check_safe_name
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.order import id_second
from libvirt_rdm_backup.repository.retention import RetentionPolicy, select, utc

KEEP = "keep"
DROP = "drop"
NEWEST = "newest of chain"


@dataclass(frozen=True)
class PointDecision:
    """One point of a chain: kept or dropped, the rule that keeps it, why it must stay."""

    manifest: Manifest
    action: str  # KEEP or DROP
    rule: str | None  # "last 1", "daily 3": the rule and which of its periods; None: no rule
    protected: str | None  # why it stays whatever the rules say ("newest of chain"), or None

    @property
    def backup_id(self) -> str:
        """Id of the point's backup."""
        return self.manifest.backup_id

    def to_dict(self) -> dict[str, Any]:
        """A point of the ``prune --json`` document."""
        return {"backup_id": self.backup_id, "created": self.manifest.created,
                "level": self.manifest.level, "action": self.action, "rule": self.rule,
                "protected": self.protected}


@dataclass(frozen=True)
class ChainPlan:
    """What prune does to one chain of one domain: its points, oldest first."""

    domain_uuid: str
    domain_name: str
    chain: str
    points: list[PointDecision]

    @property
    def kept(self) -> list[PointDecision]:
        """The points that stay, oldest first."""
        return [p for p in self.points if p.action == KEEP]

    @property
    def dropped(self) -> list[PointDecision]:
        """The points prune removes (their data merged into the next kept point)."""
        return [p for p in self.points if p.action == DROP]

    def to_dict(self) -> dict[str, Any]:
        """A chain of the ``prune --json`` document."""
        return {"domain_uuid": self.domain_uuid, "domain_name": self.domain_name,
                "chain": self.chain, "points": [p.to_dict() for p in self.points]}


def protected_by_running_exports(store: Store, domain_uuid: str, chain: Chain
                                 ) -> dict[str, str]:
    """Points of ``chain`` that a running command serves: backup id -> why.

    No command records yet which points it serves, so this finds none; it is where
    such a registry is asked.
    """
    del store, domain_uuid, chain
    return {}


def created_at(manifest: Manifest) -> datetime | None:
    """When a point was made, in UTC: its ``created``, else the second in its id, else None."""
    try:
        return utc(datetime.fromisoformat(manifest.created))
    except (TypeError, ValueError, OverflowError):  # OverflowError: out of range in UTC
        pass
    try:
        return utc(datetime.strptime(id_second(manifest.backup_id), "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None


def _builds_on(chain: Chain, unusable: Mapping[str, Mapping[str, str]],
               self_contained: bool = False) -> dict[str, list[str]]:
    """Why points must stay for the chain's next backup: backup id -> reasons
    (``self_contained``: the store's points are complete images; a differential is
    written over the newest one and needs no older point)."""
    needs: dict[tuple[str, str], list[str]] = {}  # (backup id, what builds on it) -> disks
    for disk, broken in sorted(unusable.items()):
        found = [(chain.last_point(disk), "next incremental"),
                 (chain.last_point(disk, skip=broken), "next incremental")]
        if not self_contained:
            found += [(chain.last_full_point(disk), "next differential"),
                      (chain.last_full_point(disk, skip=broken), "next differential")]
        for point, what in found:
            if point is not None and disk not in needs.setdefault((point.backup_id, what), []):
                needs[(point.backup_id, what)].append(disk)
    reasons: dict[str, list[str]] = {}
    for (backup_id, what), disks in needs.items():
        reasons.setdefault(backup_id, []).append(f"{what} of {', '.join(disks)} builds on it")
    return reasons


def protections(store: Store, domain_uuid: str, chain: Chain,
                damaged: Mapping[str, str]) -> dict[str, str]:
    """Why points of ``chain`` must stay whatever the rules say: backup id -> reasons.

    ``damaged``: the domain's backups whose manifest cannot be read (id -> problem).
    """
    reasons: dict[str, list[str]] = {}
    if chain.last is not None:
        reasons[chain.last.backup_id] = [NEWEST]
    disks = {d.disk.target for m in chain.backups for d in m.disks}
    unusable = {disk: unusable_points(chain.backups, disk, store.damage, damaged)
                for disk in disks}
    for backup_id, why in _builds_on(chain, unusable, store.self_contained).items():
        reasons.setdefault(backup_id, []).extend(why)
    for backup_id, why_served in protected_by_running_exports(store, domain_uuid, chain).items():
        reasons.setdefault(backup_id, []).append(why_served)
    for manifest in chain.backups:
        if created_at(manifest) is None:
            reasons.setdefault(manifest.backup_id, []).append("creation time unreadable")
    return {backup_id: "; ".join(why) for backup_id, why in reasons.items()}


def plan_chain(chain: Chain, policy: RetentionPolicy, protected: Mapping[str, str]
               ) -> list[PointDecision]:
    """The decisions for a chain's points, oldest first.

    The rules are counted over the points whose time is known, as if nothing were
    protected; a protected point is kept whatever they say.
    """
    times = [(m.backup_id, created_at(m)) for m in chain.backups]
    chosen = select([(b, t) for b, t in times if t is not None], policy)
    decisions = []
    for manifest in chain.backups:
        kept = chosen.get(manifest.backup_id)
        why = protected.get(manifest.backup_id)
        action = KEEP if kept is not None or why is not None else DROP
        decisions.append(PointDecision(manifest, action, str(kept) if kept else None, why))
    return decisions


def plan_prune(store: Store, domain: str | None, chain: str | None,
               policy: RetentionPolicy) -> list[ChainPlan]:
    """What prune does to each chain: of ``domain`` (UUID or name; None: every domain),
    only chain ``chain`` when given. Ordered by domain name, UUID and chain name.

    Raises NotFoundError when the domain, or the chain, has no backups.
    """
    if chain is not None:
        check_safe_name(chain, "chain name")
    listed = store.scan()
    backups = listed.backups if domain is None else find_domain_backups(store, domain)
    by_chain: dict[tuple[str, str], list[Manifest]] = {}
    for manifest in backups:
        if chain is None or manifest.chain == chain:
            by_chain.setdefault((manifest.domain_uuid, manifest.chain), []).append(manifest)
    if chain is not None and not by_chain and (domain is not None or backups):
        where = f"domain {domain!r}" if domain is not None else "any domain"
        raise NotFoundError(f"no backups in chain {chain!r} of {where} in {store.name}")
    plans = []
    for (uuid, name), manifests in by_chain.items():
        ordered = chain_of(manifests, name)
        assert ordered.last is not None  # every chain here has backups
        damaged = {d.backup_id: d.problem for d in listed.damaged if d.domain_uuid == uuid}
        protected = protections(store, uuid, ordered, damaged)
        plans.append(ChainPlan(uuid, ordered.last.domain_name, name,
                               plan_chain(ordered, policy, protected)))
    return sorted(plans, key=lambda p: (p.domain_name, p.domain_uuid, p.chain))
