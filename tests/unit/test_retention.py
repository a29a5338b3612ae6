"""Retention rules: which points ``--keep-*`` keeps, against a plain reading of the rules.

The reference below is written from Proxmox Backup Server's prune documentation and its
simulator's behaviour, with its own period names (strftime, as PBS formats them), and is
compared with :func:`select` on many seeded random chains and policies.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.repository.retention import Kept, RetentionPolicy, select

FORMATS = {"hourly": "%Y/%m/%d/%H", "daily": "%Y/%m/%d", "weekly": "%G/%V",
           "monthly": "%Y/%m", "yearly": "%Y"}
ORDER = ["last", "hourly", "daily", "weekly", "monthly", "yearly"]


def reference(points: list[tuple[str, datetime]], counts: dict[str, int]) -> dict[str, str]:
    """backup id -> "rule n" for the kept points, "" for the others.

    Newest first; per rule: a point an earlier rule decided is not looked at; a period
    holding a point an earlier rule kept is skipped without counting; the newest point of
    each new period is kept until the rule has its count, the older points of a period it
    kept are passed over, and the first point of one period too many ends the rule.
    """
    newest_first = list(reversed(points))
    state: dict[str, str] = {}  # backup id -> "keep" or "remove", once decided
    label: dict[str, str] = {}
    for rule in ORDER:
        if rule not in counts:
            continue

        def name(backup_id: str, when: datetime, rule: str = rule) -> str:
            return backup_id if rule == "last" else \
                when.astimezone(UTC).strftime(FORMATS[rule])

        already = {name(b, t) for b, t in newest_first if state.get(b) == "keep"}
        periods: list[str] = []
        for backup_id, when in newest_first:
            if backup_id in state:
                continue
            period = name(backup_id, when)
            if period in already:
                continue
            if period in periods:
                state[backup_id] = "remove"
            elif len(periods) == counts[rule]:
                break
            else:
                periods.append(period)
                state[backup_id] = "keep"
                label[backup_id] = f"{rule} {len(periods)}"
    return {backup_id: label.get(backup_id, "") for backup_id, _ in points}


def labels(points: list[tuple[str, datetime]], **counts: int) -> dict[str, str]:
    chosen = select(points, RetentionPolicy(**{f"keep_{k}": v for k, v in counts.items()}))
    return {b: str(k) if k else "" for b, k in chosen.items()}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def chain(*times: str) -> list[tuple[str, datetime]]:
    """Points named p0, p1, ... oldest first, at ``times``."""
    return [(f"p{n}", at(t)) for n, t in enumerate(times)]


def kept(result: dict[str, str]) -> dict[str, str]:
    return {b: why for b, why in result.items() if why}


# -- random chains against the reference -----------------------------------------------------

STEPS = [timedelta(minutes=7), timedelta(minutes=50), timedelta(hours=5), timedelta(days=1),
         timedelta(days=3), timedelta(days=9), timedelta(days=40), timedelta(days=200)]


def random_chain(rng: random.Random, skewed: bool) -> list[tuple[str, datetime]]:
    when = at("2024-12-20T00:00:00") + timedelta(minutes=rng.randrange(60 * 24 * 30))
    points = []
    for n in range(rng.randrange(1, 80)):
        when += rng.choice(STEPS) * rng.random() if rng.random() < 0.9 else timedelta(0)
        points.append((f"p{n:03d}", when))
    if skewed:  # clocks that jumped: the repository's order is not the order of the times
        times = [t for _, t in points]
        for _ in range(len(times) // 4):
            i, j = rng.randrange(len(times)), rng.randrange(len(times))
            times[i], times[j] = times[j], times[i]
        points = [(b, t) for (b, _), t in zip(points, times, strict=True)]
    return points


def random_counts(rng: random.Random) -> dict[str, int]:
    rules = rng.sample(ORDER, rng.randrange(1, len(ORDER) + 1))
    return {rule: rng.randrange(1, 7) for rule in rules}


@pytest.mark.parametrize("skewed", [False, True], ids=["ordered", "skewed-clock"])
def test_selection_agrees_with_the_reference(skewed: bool) -> None:
    rng = random.Random(20261207 + skewed)
    for _ in range(1500):
        points, counts = random_chain(rng, skewed), random_counts(rng)
        assert labels(points, **counts) == reference(points, counts), (points, counts)


def test_random_chains_keep_what_the_rules_promise() -> None:
    """Kept points never exceed the counts, and each rule keeps at most one per period."""
    rng = random.Random(7)
    for _ in range(300):
        points, counts = random_chain(rng, False), random_counts(rng)
        result = kept(labels(points, **counts))
        for rule, count in counts.items():
            mine = [b for b, why in result.items() if why.split()[0] == rule]
            assert len(mine) <= count
            if rule != "last":
                when = dict(points)
                assert len({when[b].strftime(FORMATS[rule]) for b in mine}) == len(mine)
        if "last" in counts:  # the newest points, whatever else is asked
            newest = [b for b, _ in points][-counts["last"]:]
            assert all(result[b].startswith("last") for b in newest)


# -- hand-written cases ----------------------------------------------------------------------

def test_several_points_in_one_hour_keep_the_newest() -> None:
    points = chain("2026-12-01T09:59:59", "2026-12-01T10:00:00", "2026-12-01T10:20:00",
                   "2026-12-01T10:59:59")
    assert kept(labels(points, hourly=5)) == {"p3": "hourly 1", "p0": "hourly 2"}


def test_gaps_count_only_the_periods_that_have_a_point() -> None:
    points = chain("2026-11-01T12:00:00", "2026-11-05T12:00:00", "2026-11-10T08:00:00",
                   "2026-11-10T20:00:00", "2026-11-11T01:00:00")
    assert kept(labels(points, daily=3)) == {"p4": "daily 1", "p3": "daily 2", "p1": "daily 3"}


def test_the_year_boundary_is_in_utc() -> None:
    points = chain("2025-12-31T23:59:59", "2026-01-01T00:00:00", "2026-06-01T00:00:00")
    assert kept(labels(points, yearly=2)) == {"p2": "yearly 1", "p0": "yearly 2"}
    # the same instants written with another offset fall in the same UTC periods
    east = timezone(timedelta(hours=2))
    shifted = [(b, t.astimezone(east)) for b, t in points]
    assert labels(shifted, yearly=2) == labels(points, yearly=2)


def test_iso_week_53_spans_the_new_year() -> None:
    # 2026 has 53 ISO weeks: Monday 2026-12-28 to Sunday 2027-01-03
    points = chain("2026-12-27T12:00:00", "2026-12-29T12:00:00", "2027-01-02T12:00:00",
                   "2027-01-04T12:00:00")
    assert kept(labels(points, weekly=3)) == {"p3": "weekly 1", "p2": "weekly 2",
                                              "p0": "weekly 3"}
    assert kept(labels(points, yearly=3)) == {"p3": "yearly 1", "p1": "yearly 2"}


def test_keep_last_comes_first_and_its_periods_are_not_counted_again() -> None:
    days = [f"2026-12-{d:02d}T12:00:00" for d in range(1, 11)]
    points = chain(*days, "2026-12-10T18:00:00")
    assert kept(labels(points, last=2, daily=3)) == {
        "p10": "last 1", "p9": "last 2", "p8": "daily 1", "p7": "daily 2", "p6": "daily 3"}


def test_a_rule_does_not_look_again_at_points_an_earlier_rule_passed_over() -> None:
    points = chain("2026-11-30T10:00:00", "2026-12-01T10:00:00", "2026-12-01T10:30:00")
    # hourly keeps 10:30 and passes over 10:00 of the same hour; daily's day 12-01 is taken
    assert kept(labels(points, hourly=1, daily=2)) == {"p2": "hourly 1", "p0": "daily 1"}


def test_a_rule_stops_at_its_first_period_too_many() -> None:
    """With clocks that jumped, the rest of the walk is left to the next rules (as PBS)."""
    # oldest first in the repository's order: c (week 49, November), b (October), a (week
    # 49, December)
    points = [("c", at("2026-11-30T08:00:00")), ("b", at("2026-10-20T08:00:00")),
              ("a", at("2026-12-02T08:00:00"))]
    # weekly 1 keeps a and stops at b, so c (a's ISO week, but November) is still open
    assert kept(labels(points, weekly=1, monthly=2)) == {"a": "weekly 1", "b": "monthly 1",
                                                         "c": "monthly 2"}


def test_one_point_and_no_points() -> None:
    assert labels(chain("2026-12-01T00:00:00"), monthly=1) == {"p0": "monthly 1"}
    assert labels([], last=1) == {}


def test_times_without_an_offset_are_utc() -> None:
    naive = [("a", datetime(2026, 12, 31, 23, 0)), ("b", datetime(2027, 1, 1, 1, 0))]
    assert kept(labels(naive, yearly=5)) == {"b": "yearly 1", "a": "yearly 2"}


# -- the policy --------------------------------------------------------------------------------

@pytest.mark.parametrize("counts", [{}, {"keep_daily": 0}, {"keep_last": -1},
                                    {"keep_weekly": True}, {"keep_monthly": 1.5},
                                    {"keep_yearly": 10**10}])
def test_a_policy_needs_positive_counts_and_at_least_one_rule(counts: dict[str, object]
                                                               ) -> None:
    with pytest.raises(UsageError):
        RetentionPolicy(**counts)  # type: ignore[arg-type]


def test_the_policy_lists_its_rules_in_the_order_they_apply() -> None:
    policy = RetentionPolicy(keep_yearly=1, keep_last=2, keep_weekly=4)
    assert policy.rules() == [("last", 2), ("weekly", 4), ("yearly", 1)]
    assert policy.options() == "--keep-last 2 --keep-weekly 4 --keep-yearly 1"
    assert str(Kept("daily", 3)) == "daily 3"
