"""Retention rules: which points of a chain ``--keep-last``/``--keep-hourly``/... keep.

Pure: no I/O. The rules are those of Proxmox Backup Server's prune. They are
applied in the order last, hourly, daily, weekly, monthly, yearly; walking the
points newest first, each rule keeps the newest point of each of the last N
periods (hours, days, ISO weeks, months, years; ``last``: single points) that
have a point. A point kept or passed over by an earlier rule is not looked at
again, and a period that already holds a point an earlier rule kept is skipped
without counting. When a rule has its N periods, it stops at the first point of
a further period: the points after it are left to the next rules.

Periods are those of the points' creation times in UTC. "Newest" is the
repository's order (:mod:`.order`), not the clock: the points are given oldest
first in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from libvirt_rdm_backup.errors import UsageError

#: the rules in the order they are applied (``last`` counts single points)
RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
#: the period each rule but ``last`` counts, of a time in UTC
PERIODS: dict[str, Callable[[datetime], Hashable]] = {
    "hourly": lambda when: (when.year, when.month, when.day, when.hour),
    "daily": lambda when: (when.year, when.month, when.day),
    "weekly": lambda when: tuple(when.isocalendar())[:2],  # ISO year and week
    "monthly": lambda when: (when.year, when.month),
    "yearly": lambda when: when.year,
}
MAX_COUNT = 10**9  # more than any repository holds; bigger numbers are refused as typos


@dataclass(frozen=True)
class RetentionPolicy:
    """How many points each rule keeps (None: the rule is not used); at least one is set."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if (not isinstance(value, int) or isinstance(value, bool)
                    or not 0 < value <= MAX_COUNT):
                raise UsageError(f"--{f.name.replace('_', '-')} needs a positive whole "
                                 f"number, not {value!r}")
        if not self.rules():
            raise UsageError("give at least one of --keep-last, --keep-hourly, --keep-daily, "
                             "--keep-weekly, --keep-monthly, --keep-yearly")

    def rules(self) -> list[tuple[str, int]]:
        """The rules in use, in the order they are applied: (name, count)."""
        found = [(name, getattr(self, f"keep_{name}")) for name in RULES]
        return [(name, count) for name, count in found if count is not None]

    def options(self) -> str:
        """The rules as command-line options (``--keep-last 1 --keep-daily 7``)."""
        return " ".join(f"--keep-{name} {count}" for name, count in self.rules())


@dataclass(frozen=True)
class Kept:
    """Why a point is kept: the rule, and which of its periods (1: the newest) it is for."""

    rule: str
    count: int

    def __str__(self) -> str:
        return f"{self.rule} {self.count}"


def utc(when: datetime) -> datetime:
    """``when`` in UTC (a time without an offset is taken as UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def select(points: Sequence[tuple[str, datetime]], policy: RetentionPolicy
           ) -> dict[str, Kept | None]:
    """Which rule keeps each point (None: no rule keeps it), by backup id.

    ``points``: (backup id, creation time) of a chain's points, oldest first.
    """
    newest_first = [(backup_id, utc(when)) for backup_id, when in reversed(points)]
    marks: dict[str, Kept | None] = {}  # a point in here is decided: kept, or passed over
    for rule, count in policy.rules():
        _apply(rule, count, newest_first, marks)
    return {backup_id: marks.get(backup_id) for backup_id, _when in points}


def _apply(rule: str, count: int, newest_first: list[tuple[str, datetime]],
           marks: dict[str, Kept | None]) -> None:
    """One rule: mark the points it keeps and those it passes over in ``marks``."""
    def period(backup_id: str, when: datetime) -> Hashable:
        return backup_id if rule == "last" else PERIODS[rule](when)

    covered = {period(b, w) for b, w in newest_first if marks.get(b) is not None}
    counted: dict[Hashable, int] = {}
    for backup_id, when in newest_first:
        if backup_id in marks:
            continue
        key = period(backup_id, when)
        if key in covered:
            continue  # an earlier rule kept a point of this period: not counted again
        if key in counted:
            marks[backup_id] = None  # an older point of a period this rule kept
            continue
        if len(counted) >= count:
            break
        counted[key] = len(counted) + 1
        marks[backup_id] = Kept(rule, counted[key])
