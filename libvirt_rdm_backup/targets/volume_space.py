"""Space in an NBD volume: regions, the free list, allocation and the checks of both.

A region is ``(offset, length)``, 1 MiB aligned, in the data area. The volume's
table of contents keeps a **free list** (sorted, coalesced regions below the
allocation pointer that no listed backup uses) and, per entry, the regions its
backup owns (manifest and layers). Allocation is best fit: a region's size is
set by its disk's size, so the region of a dropped point of the same disk is an
exact fit, and larger holes stay whole for larger disks. Pure functions: the
volume (:mod:`volume_changes`) does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from libvirt_rdm_backup.targets.volume_format import (
    ALIGN,
    DATA_START,
    MAX_REGIONS,
    Region,
    Superblock,
    _is_int,
    align,
    journal_region,
)

__all__ = ["Region", "best_fit", "entry_regions", "lower_end", "normalize", "overlap",
           "space_problem", "subtract", "total"]


def normalize(regions: Iterable[Region]) -> list[Region]:
    """Sorted, with overlapping and adjacent regions merged."""
    merged: list[Region] = []
    for offset, length in sorted(r for r in regions if r[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def subtract(regions: Iterable[Region], taken: Iterable[Region]) -> list[Region]:
    """What of ``regions`` lies outside every region of ``taken`` (normalized; one sweep)."""
    cut = normalize(taken)
    result: list[Region] = []
    first = 0
    for offset, length in normalize(regions):
        start, end = offset, offset + length
        while first < len(cut) and cut[first][0] + cut[first][1] <= start:
            first += 1
        index = first
        while index < len(cut) and cut[index][0] < end:
            if cut[index][0] > start:
                result.append((start, cut[index][0] - start))
            start = max(start, cut[index][0] + cut[index][1])
            index += 1
        if start < end:
            result.append((start, end - start))
    return result


def overlap(regions: Iterable[Region], others: Iterable[Region]) -> list[Region]:
    """What ``regions`` and ``others`` have in common."""
    regions = normalize(regions)
    return subtract(regions, subtract(regions, others))


def total(regions: Iterable[Region]) -> int:
    """Bytes the regions span."""
    return sum(length for _offset, length in regions)


def best_fit(free: list[Region], length: int) -> tuple[int, list[Region]] | None:
    """The offset of the smallest free region that holds ``length`` bytes (the lowest of
    equals), and the free list without them; None when none is large enough."""
    want = align(length)
    fits = [(size, offset) for offset, size in free if size >= want]
    if not fits:
        return None
    size, offset = min(fits)
    rest = [r for r in free if r[0] != offset]
    if size > want:
        rest.append((offset + want, size - want))
    return offset, sorted(rest)


def lower_end(free: list[Region], next_free: int) -> tuple[list[Region], int]:
    """A free region that ends at the allocation pointer goes: the pointer moves down."""
    free = normalize(free)
    while free and free[-1][0] + free[-1][1] >= next_free:
        next_free = min(next_free, free[-1][0])
        free.pop()
    return free, next_free


def _region_problem(region: Any, limit: int) -> str | None:
    """What is wrong with one stored ``[offset, length]`` (None: fine)."""
    if not isinstance(region, list | tuple) or len(region) != 2:
        return f"{region!r} is not a region"
    offset, length = region
    if not _is_int(offset) or not _is_int(length):
        return f"{list(region)!r} is not a region"
    if offset % ALIGN or length % ALIGN or length <= 0:
        return f"region {offset}+{length} is not aligned to {ALIGN >> 20} MiB"
    if offset < DATA_START or offset + length > limit:
        return f"region {offset}+{length} is outside the data area"
    return None


def entry_regions(entry: dict[str, Any], size: int) -> list[Region] | None:
    """The regions an entry owns (None: written before entries listed them).

    Raises ValueError naming what is wrong with a malformed list.
    """
    stored = entry.get("regions")
    if stored is None:
        return None
    if not isinstance(stored, list) or len(stored) > MAX_REGIONS:
        raise ValueError(f"backup {str(entry.get('backup_id'))[:40]!r}: malformed regions")
    for region in stored:
        problem = _region_problem(region, size)
        if problem is not None:
            raise ValueError(f"backup {str(entry.get('backup_id'))[:40]!r}: {problem}")
    return [(int(o), int(n)) for o, n in stored]


def space_problem(table: Superblock, size: int) -> str | None:
    """What is wrong with a table's free list and its entries' regions (None: usable).

    Each free region is aligned, inside the data area below the allocation
    pointer; the list is sorted without overlaps and holds at most MAX_REGIONS;
    no free region overlaps a region a listed backup (or the journal of a key change) owns.
    """
    free = table.free
    if len(free) > MAX_REGIONS:
        return f"{len(free)} free regions (at most {MAX_REGIONS})"
    limit = min(size, table.next_free)
    for index, region in enumerate(free):
        problem = _region_problem(region, limit)
        if problem is not None:
            return f"free {problem}"
        if index and region[0] < free[index - 1][0] + free[index - 1][1]:
            return f"free regions at {free[index - 1][0]} and {region[0]} overlap or are unsorted"
    live = journal_region(table)
    try:
        for entry in table.entries:
            live += entry_regions(entry, size) or []
    except ValueError as err:
        return str(err)
    if len(live) > MAX_REGIONS:
        return f"{len(live)} regions of listed backups (at most {MAX_REGIONS})"
    clash = overlap(free, live)
    if clash:
        return f"free region at {clash[0][0]} is used by a listed backup"
    return None
