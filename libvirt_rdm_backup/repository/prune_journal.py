"""The prune journal: what a prune of a domain's points is doing, written before it changes
anything, so that a prune cut short (killed, power lost) is finished by the next command.

``ROOT/<domain-uuid>/.prune-journal.json``::

    {"format": "libvirt-rdm-backup/prune-journal", "version": 1,
     "domain_uuid": ..., "chain": ..., "created": ...,
     "drop": [backup ids],
     "merges": [{"disk": "vdb", "kept": id, "dropped": [ids, newest first],
                 "base": id or null, "direction": "up" | "down"}]}

A merge moves the data of the ``dropped`` points of one disk (the kept point's parent
and its parents, down to ``base``, the next point kept) into the ``kept`` point's layer:
``up`` streams it into the kept layer; ``down`` commits the kept layer and the newer
dropped ones into the oldest dropped layer, which then replaces the kept layer;
``rebase`` (dropped layers another kept point took in already) writes into the kept
layer where it reads differently from ``base``, an older kept point, and backs it by it.

Read back as untrusted input: ids and names must be what the tool writes, and the
caller checks the merges against the manifests before acting on any of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from libvirt_rdm_backup.errors import RepositoryError, UsageError
from libvirt_rdm_backup.repository import journal_file
from libvirt_rdm_backup.repository.chain import chain_of
from libvirt_rdm_backup.repository.ids import check_backup_id, check_safe_name, check_uuid
from libvirt_rdm_backup.repository.manifest import Manifest

JOURNAL = ".prune-journal.json"
FORMAT = "libvirt-rdm-backup/prune-journal"
VERSION = 1
MAX_JOURNAL = 4 << 20
DIRECTIONS = ("up", "down", "rebase")


@dataclass(frozen=True)
class Merge:
    """The dropped points of one disk whose data a kept point takes in."""

    disk: str
    kept: str
    dropped: tuple[str, ...]  # the kept point's parent first, down to the one above ``base``
    base: str | None  # the kept point below them (None: the kept point becomes a full copy)
    direction: str  # "up": streamed into the kept layer; "down": committed into the oldest;
    # "rebase": onto ``base``, a kept point that took the dropped layers in


@dataclass(frozen=True)
class Journal:
    """One prune of one chain of one domain."""

    domain_uuid: str
    chain: str
    created: str
    drop: tuple[str, ...]
    merges: tuple[Merge, ...]

    def dumps(self) -> str:
        """The journal as written (JSON, one document)."""
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)},
                          indent=1, sort_keys=True) + "\n"

    @classmethod
    def loads(cls, text: str) -> Journal:
        """Parse and check a journal; RepositoryError on anything the tool would not write."""
        data = journal_file.parse(text, "prune journal", FORMAT, VERSION)
        try:
            drop = tuple(check_backup_id(str(i)) for i in _list(data.get("drop")))
            journal = cls(
                domain_uuid=check_uuid(str(data.get("domain_uuid"))),
                chain=check_safe_name(str(data.get("chain")), "chain name"),
                created=str(data.get("created"))[:64],
                drop=drop,
                merges=tuple(_merge(m) for m in _list(data.get("merges"))),
            )
        except UsageError as err:
            raise RepositoryError(f"prune journal is malformed: {err}") from err
        _check_consistent(journal)
        return journal


def _list(value: object) -> list[object]:
    if not isinstance(value, list) or len(value) > 100_000:
        raise RepositoryError("prune journal is malformed: a list is missing or too long")
    return value


def _merge(value: object) -> Merge:
    if not isinstance(value, dict):
        raise RepositoryError("prune journal is malformed: a merge is not an object")
    base = value.get("base")
    direction = value.get("direction")
    if direction not in DIRECTIONS:
        raise RepositoryError(f"prune journal is malformed: direction {direction!r}")
    return Merge(
        disk=check_safe_name(str(value.get("disk")), "disk name"),
        kept=check_backup_id(str(value.get("kept"))),
        dropped=tuple(check_backup_id(str(i)) for i in _list(value.get("dropped"))),
        base=None if base is None else check_backup_id(str(base)),
        direction=str(direction),
    )


def _check_consistent(journal: Journal) -> None:
    """Merges take in dropped points only, onto points that stay."""
    dropped = set(journal.drop)
    for merge in journal.merges:
        if not merge.dropped or not set(merge.dropped) <= dropped:
            raise RepositoryError("prune journal is malformed: a merge takes in a point "
                                  "that is not dropped")
        if merge.kept in dropped or (merge.base is not None and merge.base in dropped):
            raise RepositoryError("prune journal is malformed: a merge onto a dropped point")


def journal_path(domain_dir: str) -> str:
    """Where the journal of a domain's prune is kept."""
    return os.path.join(domain_dir, JOURNAL)


def read_journal(domain_dir: str) -> Journal | None:
    """The journal of an unfinished prune of the domain, or None."""
    text = journal_file.read_text(journal_path(domain_dir), "prune journal", MAX_JOURNAL)
    return None if text is None else Journal.loads(text)


def write_journal(domain_dir: str, journal: Journal) -> None:
    """Write the journal atomically (synced before anything it describes is changed)."""
    journal_file.write_text(journal_path(domain_dir), journal.dumps(), "prune journal")


def remove_journal(domain_dir: str) -> None:
    """The prune is complete: the journal goes."""
    journal_file.remove(journal_path(domain_dir), "prune journal")


def check_against(journal: Journal, backups: list[Manifest], unreadable: list[str]) -> None:
    """The journal is one this tool would write for these backups of its domain (their
    manifests as they are now: some merges may be published already); RepositoryError
    naming what is not, before anything of it is acted on."""
    def refuse(why: str) -> RepositoryError:
        return RepositoryError(f"prune journal of domain {journal.domain_uuid}: {why}; "
                               "nothing more is done")

    if unreadable:
        raise refuse(f"backup {unreadable[0]} cannot be read (what builds on what is not "
                     "known)")
    by_id = {m.backup_id: m for m in backups}
    chain = chain_of(backups, journal.chain)
    ids = {m.backup_id for m in chain.backups}
    drop = set(journal.drop)
    if (drop & set(by_id)) - ids:
        raise refuse("it drops a backup of another chain")
    disks = {r.disk.target for m in chain.backups for r in m.disks}
    needed = {p.backup_id for disk in disks
              for p in (chain.last_point(disk), chain.last_full_point(disk)) if p is not None}
    if chain.last is not None:
        needed.add(chain.last.backup_id)
    if drop & needed:
        raise refuse(f"it drops backup {sorted(drop & needed)[0]}, which the next backup "
                     "builds on")
    for index, merge in enumerate(journal.merges):
        problem = _merge_problem(merge, journal.merges[:index], journal.merges, by_id, ids,
                                 drop)
        if problem is not None:
            raise refuse(problem)
    covered = {(m.kept, m.disk) for m in journal.merges}
    for manifest in backups:
        for record in manifest.disks:
            if (manifest.backup_id not in drop and record.parent in drop
                    and (manifest.backup_id, record.disk.target) not in covered):
                raise refuse(f"backup {manifest.backup_id} builds on dropped backup "
                             f"{record.parent} and no merge takes it in")


def _merge_problem(merge: Merge, earlier: tuple[Merge, ...], merges: tuple[Merge, ...],
                   by_id: dict[str, Manifest], ids: set[str], drop: set[str]) -> str | None:
    """What in one merge does not fit the manifests (None: it fits)."""
    kept = by_id.get(merge.kept)
    record = kept.disk(merge.disk) if kept is not None else None
    if kept is None or record is None or merge.kept not in ids:
        return f"backup {merge.kept} with disk {merge.disk} is not in the chain"
    if record.parent == merge.base and record.parent not in drop:
        return None  # merged and published
    walked: list[str] = []
    below = record.parent
    while below is not None and below in drop:
        walked.append(below)
        point = by_id[below].disk(merge.disk) if below in by_id else None
        below = point.parent if point is not None else None
    if tuple(walked) != merge.dropped:
        return f"the merge into {merge.disk} of {merge.kept} names other dropped layers"
    shared = any(merge.disk == other.disk and other is not merge
                 and set(other.dropped) & set(merge.dropped) for other in merges)
    if merge.direction == "rebase":
        takers = [o.kept for o in earlier if o.disk == merge.disk and o.direction == "up"
                  and set(o.dropped) & set(merge.dropped)]
        if not takers or merge.base != takers[0]:
            return f"the rebase of {merge.disk} of {merge.kept} is not onto the point that " \
                   "took its dropped layers in"
    elif below != merge.base:
        return f"the merge into {merge.disk} of {merge.kept} names another base"
    if merge.direction == "down" and shared:
        return f"the merge into {merge.disk} of {merge.kept} commits into a shared layer"
    return None
