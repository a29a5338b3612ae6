"""The order of backups: parent links and publish sequence numbers, never the wall clock.

Every manifest carries ``sequence``, one more than the highest sequence of its
repository (or NBD volume) when it was published, taken under the writer's lock.
The order of backups is that sequence, with parent links having the last word (a
backup always comes after the backups it builds on). Manifests written before
sequence numbers existed come before every sequenced one and keep the old rule
among themselves: the second in their id, then ``created``. Clocks that jump
forward or back between backups therefore change neither "newest" nor a chain's
last point.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from libvirt_rdm_backup.errors import VerificationError
from libvirt_rdm_backup.repository.manifest import MAX_SEQUENCE, Manifest


class Listed(Protocol):
    """A published backup as listed: readable (a manifest) or not (only id and sequence)."""

    @property
    def backup_id(self) -> str: ...

    @property
    def sequence(self) -> int | None: ...


T = TypeVar("T", bound=Listed)


def id_second(backup_id: str) -> str:
    """The second a backup id was made in (``20261125T143000Z``), by the clock of its host."""
    return backup_id.partition("-")[0]


def _rank(item: Listed) -> tuple[int, int, str, str, str]:
    """Where an item goes when parent links do not decide (sequenced after unsequenced)."""
    if item.sequence is not None:
        return 1, item.sequence, "", "", item.backup_id
    created = item.created if isinstance(item, Manifest) else ""
    return 0, 0, id_second(item.backup_id), created, item.backup_id


def parents(item: Listed) -> set[str]:
    """Ids of the backups ``item`` builds on (none for an unreadable one)."""
    if not isinstance(item, Manifest):
        return set()
    found = {r.parent for r in item.disks if r.parent}
    if item.parent:
        found.add(item.parent)
    return found


def in_order(items: Iterable[T]) -> list[T]:
    """``items`` oldest first: each after what it builds on, else by sequence (see module)."""
    listed = list(items)
    index = {item.backup_id: n for n, item in enumerate(listed)}
    waiting = [0] * len(listed)  # parents present and not yet placed
    children: dict[int, list[int]] = {n: [] for n in range(len(listed))}
    for n, item in enumerate(listed):
        for parent in parents(item):
            p = index.get(parent)
            if p is not None and p != n:
                waiting[n] += 1
                children[p].append(n)
    ready = [(_rank(listed[n]), n) for n in range(len(listed)) if waiting[n] == 0]
    heapq.heapify(ready)
    placed: list[int] = []
    done = [False] * len(listed)
    while len(placed) < len(listed):
        if not ready:  # a loop of parent links (a hostile manifest): rank alone breaks it
            rest = min((_rank(listed[n]), n) for n in range(len(listed)) if not done[n])
            heapq.heappush(ready, rest)
        _rank_of, n = heapq.heappop(ready)
        if done[n]:
            continue
        done[n] = True
        placed.append(n)
        for child in children[n]:
            waiting[child] -= 1
            if waiting[child] == 0 and not done[child]:
                heapq.heappush(ready, (_rank(listed[child]), child))
    return [listed[n] for n in placed]


def newest(items: Iterable[T]) -> T | None:
    """The newest of ``items`` (None when there is none)."""
    ordered = in_order(items)
    return ordered[-1] if ordered else None


def next_sequence(sequences: Iterable[int | None]) -> int:
    """The sequence of the next backup: one more than the highest one in use.

    Raises VerificationError when that would pass :data:`MAX_SEQUENCE`: only a
    repository someone wrote by hand gets there.
    """
    highest = max((s for s in sequences if s is not None), default=0)
    if highest >= MAX_SEQUENCE:
        raise VerificationError(f"sequence number {highest} is beyond what this tool writes: "
                                "the repository was altered; back up to another one")
    return highest + 1


def newest_damage(damaged: Iterable[str | Listed], readable: Sequence[Manifest]) -> str | None:
    """The unreadable backup that may be newer than every ``readable`` one, or None.

    One that a readable backup builds on is older. Otherwise its sequence (when
    its place in the repository still tells it) decides; without one, the second
    in its id is compared with the newest readable backup's (the rule before
    sequence numbers), and within that second it is taken as newer, so that
    nothing falls back to an older point unasked.
    """
    candidates = [_Unreadable(d, None) if isinstance(d, str) else d for d in damaged]
    last = newest(readable)
    if last is None:
        found = newest(candidates)
        return found.backup_id if found is not None else None
    built_on = set().union(*(parents(m) for m in readable))
    newer = [d for d in candidates if d.backup_id not in built_on and _may_be_newer(d, last)]
    found = newest(newer)
    return found.backup_id if found is not None else None


def _may_be_newer(item: Listed, last: Manifest) -> bool:
    if item.sequence is not None:
        return last.sequence is None or item.sequence > last.sequence
    return id_second(item.backup_id) >= id_second(last.backup_id)


class _Unreadable:
    """An unreadable backup known by its id alone."""

    def __init__(self, backup_id: str, sequence: int | None) -> None:
        self.backup_id = backup_id
        self.sequence = sequence
