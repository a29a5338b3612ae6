"""An NBD volume's free list: allocation, coalescing, dropping and replacing points, trims,
the checks of a hostile list, and a table of contents bounded by the live points (export
in memory)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from libvirt_rdm_backup.errors import (
    NotFoundError,
    RepositoryError,
    UsageError,
    VerificationError,
)
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.targets import volume_changes, volume_format
from libvirt_rdm_backup.targets.lease import Lease
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_format import (
    ALIGN,
    DATA_START,
    MAX_BODY,
    MAX_REGIONS,
    SLOT,
    Superblock,
    read_table,
)
from libvirt_rdm_backup.targets.volume_space import (
    best_fit,
    lower_end,
    normalize,
    overlap,
    space_problem,
    subtract,
)
from tests.unit.test_repository_damage_units import UUID, vdb
from tests.unit.test_volume_damage import SIZE, MemoryExport, volume

MiB = 1 << 20
LAYER = 4 * MiB  # the region of each test layer


class TrimExport(MemoryExport):
    """A memory export that takes trims (they read back as zeros) and remembers them."""

    def __init__(self, size: int, zeroes: bool = True) -> None:
        super().__init__(size)
        self.trims: list[tuple[int, int]] = []
        self.zeroes = zeroes

    def can_trim(self) -> bool:
        return True

    def trim(self, count: int, offset: int) -> None:
        self.trims.append((offset, count))
        if self.zeroes:
            self.data[offset:offset + count] = bytes(count)


def table(export: MemoryExport) -> Superblock:
    found = read_table(export, "mem")
    assert found is not None
    return found


def write_table(export: MemoryExport, block: Superblock) -> None:
    """Write ``block`` as the newest generation (as a server could)."""
    block = replace(block, generation=table(export).generation + 1)
    export.pwrite(block.to_bytes(), 0 if block.generation % 2 == 0 else SLOT)


def backup(vol: NbdVolume, index: int, fill: int = 0, region: int = LAYER) -> Manifest:
    """Publish a one-disk backup as a backup does: lease, a layer region, the manifest.

    ``fill``: bytes written at the start of the layer region (its data)."""
    if vol._lease is None:
        vol.take_lease()
    offset = vol.allocate(region)
    if fill:
        vol.write(offset, bytes([index % 250 + 1]) * fill)
    backup_id = f"20260101T{index:06d}Z-{index % 1000000:06d}"
    record = DiskRecord(disk=vdb(), size=1 << 30, data_file="vdb.qcow2", format="qcow2",
                        digest=Digest("sha256", "0" * 64), level="full", data_path="qemu",
                        bytes_transferred=0, stored_bytes=fill,
                        location={"offset": offset, "region": region, "length": fill})
    manifest = Manifest(backup_id=backup_id, domain_uuid=UUID, domain_name="vm",
                        level="full", created=backup_id, completed=backup_id,
                        consistency={}, domain_xml="<domain/>", disks=[record])
    vol.publish(manifest)
    return manifest


def owned(block: Superblock, backup_id: str) -> list[tuple[int, int]]:
    entry = next(e for e in block.entries if e["backup_id"] == backup_id)
    return [tuple(r) for r in entry["regions"]]  # type: ignore[misc]


def live(block: Superblock) -> list[tuple[int, int]]:
    return normalize(tuple(r) for e in block.entries for r in e["regions"])  # type: ignore[misc]


# -- the region arithmetic ------------------------------------------------------------------


def test_regions_coalesce_and_subtract() -> None:
    assert normalize([(5, 2), (0, 2), (2, 3), (9, 1), (9, 0)]) == [(0, 7), (9, 1)]
    assert subtract([(0, 10), (20, 10)], [(2, 2), (8, 14), (25, 1)]) == [
        (0, 2), (4, 4), (22, 3), (26, 4)]
    assert overlap([(0, 10)], [(5, 10), (20, 1)]) == [(5, 5)]
    assert subtract([(0, 10)], []) == [(0, 10)]


def test_best_fit_takes_the_smallest_hole_that_holds_it_and_keeps_the_rest() -> None:
    free = [(2 * MiB, 8 * MiB), (20 * MiB, 4 * MiB), (40 * MiB, 4 * MiB), (60 * MiB, 16 * MiB)]
    assert best_fit(free, 4 * MiB) == (20 * MiB, [f for f in free if f[0] != 20 * MiB])
    offset, rest = best_fit(free, 5 * MiB + 1) or (0, [])
    assert offset == 2 * MiB and (8 * MiB, 2 * MiB) in rest  # rounded up to 6 MiB
    assert best_fit(free, 17 * MiB) is None


def test_a_free_region_at_the_end_lowers_the_allocation_pointer() -> None:
    assert lower_end([(2 * MiB, MiB), (5 * MiB, 2 * MiB)], 7 * MiB) == ([(2 * MiB, MiB)],
                                                                        5 * MiB)
    assert lower_end([(2 * MiB, 5 * MiB)], 7 * MiB) == ([], 2 * MiB)
    assert lower_end([(2 * MiB, MiB)], 7 * MiB) == ([(2 * MiB, MiB)], 7 * MiB)


def test_random_allocations_and_frees_keep_the_space_accounted() -> None:
    """Whatever the order: free and used never overlap and together cover the data area
    below the pointer; the free list stays coalesced."""
    rng = random.Random(7)
    free: list[tuple[int, int]] = []
    used: list[tuple[int, int]] = []
    next_free = DATA_START
    for _ in range(3000):
        if used and rng.random() < 0.45:
            gone = used.pop(rng.randrange(len(used)))
            free, next_free = lower_end([*free, gone], next_free)
        else:
            length = rng.choice([1, 1, 4, 9]) * MiB
            fit = best_fit(free, length)
            if fit is None:
                fit = next_free, free
                next_free += length
            offset, free = fit
            used.append((offset, length))
        assert not overlap(free, used)
        assert normalize([*free, *used]) == ([(DATA_START, next_free - DATA_START)]
                                             if used else [])
        assert free == normalize(free)


# -- dropping, reusing, replacing -----------------------------------------------------------


def test_dropped_points_free_their_regions_which_are_trimmed_and_reused() -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i, fill=MiB) for i in range(4)]
    before = table(export)
    gone = owned(before, points[1].backup_id) + owned(before, points[2].backup_id)
    assert sum(n for _o, n in gone) == 2 * (LAYER + MiB)  # a layer and a manifest each

    report = vol.publish_changes(UUID, drop=[points[1].backup_id, points[2].backup_id])
    after = table(export)
    assert [e["backup_id"] for e in after.entries] == [points[0].backup_id,
                                                       points[3].backup_id]
    assert after.generation > before.generation and after.lease is None
    assert after.free == normalize(gone) and report.freed == report.free == 10 * MiB
    assert not overlap(after.free, live(after))
    assert report.trimmed == 10 * MiB and normalize(export.trims) == after.free
    assert all(export.data[o:o + n] == bytes(n) for o, n in after.free)  # data gone
    for kept in (points[0], points[3]):  # untouched
        offset = kept.disks[0].location["offset"]  # type: ignore[index]
        assert export.data[offset:offset + MiB] != bytes(MiB)

    again = backup(vol, 9)
    regions = owned(table(export), again.backup_id)
    assert normalize(regions) == normalize(overlap(regions, after.free))  # reused holes only
    assert table(export).next_free == after.next_free


def test_dropping_the_newest_points_lowers_the_allocation_pointer() -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(3)]
    first_end = max(o + n for o, n in owned(table(export), points[0].backup_id))
    vol.publish_changes(UUID, drop=[p.backup_id for p in points[1:]])
    after = table(export)
    assert after.free == [] and after.next_free == first_end


def test_a_replaced_manifest_keeps_its_sequence_and_frees_what_it_no_longer_uses() -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i, fill=MiB) for i in range(3)]
    before = table(export)
    sequences = {e["backup_id"]: e["sequence"] for e in before.entries}
    vol.take_lease()  # the merge of a kept point writes its new layer under the lease
    moved = vol.allocate(LAYER)
    vol.write(moved, b"merged" * 100)
    new = replace(points[2], disks=[replace(points[2].disks[0], location={
        "offset": moved, "region": LAYER, "length": 600})])
    old_regions = owned(before, points[2].backup_id)
    report = vol.publish_changes(UUID, replace_with=[new], drop=[points[0].backup_id])
    after = table(export)
    assert [e["backup_id"] for e in after.entries] == [points[1].backup_id,
                                                       points[2].backup_id]
    assert {e["backup_id"]: e["sequence"] for e in after.entries} == {
        k: v for k, v in sequences.items() if k != points[0].backup_id}
    assert overlap([(moved, LAYER)], owned(after, points[2].backup_id)) == [(moved, LAYER)]
    assert not overlap(after.free, live(after))
    assert normalize(overlap(old_regions, after.free)) == normalize(old_regions)
    assert report.free == sum(n for _o, n in after.free)
    listed, damaged = volume(export).scan()
    assert damaged == [] and listed[-1].disks[0].location["offset"] == moved  # type: ignore[index]
    assert listed[-1].sequence == points[2].sequence


def test_unknown_or_doubly_named_backups_change_nothing() -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(2)]
    generation = table(export).generation
    with pytest.raises(NotFoundError, match="not in the volume"):
        vol.publish_changes(UUID, drop=["20990101T000000Z-000000"])
    vol.release_lease()
    with pytest.raises(NotFoundError):
        vol.publish_changes("11111111-2222-3333-4444-555555555555",
                            drop=[points[0].backup_id])
    vol.release_lease()
    with pytest.raises(UsageError, match="both dropped and replaced"):
        vol.publish_changes(UUID, replace_with=[points[1]], drop=[points[1].backup_id])
    vol.release_lease()
    block = table(export)
    assert [e["backup_id"] for e in block.entries] == [p.backup_id for p in points]
    assert block.free == [] and export.trims == [] and block.generation > generation


def test_a_crash_while_publishing_leaves_the_old_table_and_nothing_trimmed() -> None:
    class Crash(Exception):
        pass

    class TornExport(TrimExport):
        armed = False

        def pwrite(self, buf: bytes, offset: int) -> None:
            if self.armed and offset in (0, SLOT) and len(buf) > 64:
                super().pwrite(buf[:len(buf) // 2], offset)  # the server died mid-write
                self.armed = False  # and came back
                raise Crash
            super().pwrite(buf, offset)

    export = TornExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i, fill=MiB) for i in range(3)]
    before = table(export)
    vol.take_lease()
    export.armed = True
    with pytest.raises(Crash):
        vol.publish_changes(UUID, drop=[points[0].backup_id])
    after = table(export)
    assert after.entries == before.entries and after.free == []
    assert export.trims == []


def test_a_table_that_would_not_fit_its_slot_fails_in_one_line_and_changes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(2)]
    vol.take_lease()
    before = table(export)
    monkeypatch.setattr(volume_format, "MAX_BODY", len(before.to_bytes()) - 56 + 8)
    with pytest.raises(RepositoryError) as err:  # the free list grows by more than 8 bytes
        vol.publish_changes(UUID, replace_with=[points[0]])
    vol.release_lease()
    assert "table of contents is full" in str(err.value) and "\n" not in str(err.value)
    assert table(export).entries == before.entries and table(export).free == []
    assert export.trims == [] and MAX_BODY > 900 << 10


def test_a_volume_written_before_free_lists_gets_one_on_its_first_change() -> None:
    """Entries without their regions (an older writer's) are read from their manifests."""
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(3)]
    old = table(export)
    regions = {p.backup_id: owned(old, p.backup_id) for p in points}
    doc = json.loads(old.to_bytes()[volume_format._HEAD.size:])
    doc.pop("free")
    for entry in doc["entries"]:
        entry.pop("regions")
    legacy = volume_format.Superblock.parse(_slot(doc, old.generation + 1))
    assert legacy is not None and legacy.free == []
    write_table(export, legacy)

    vol = volume(export)
    vol.publish_changes(UUID, drop=[points[1].backup_id])
    after = table(export)
    assert after.free == normalize(regions[points[1].backup_id])
    for point in (points[0], points[2]):
        assert owned(after, point.backup_id) == regions[point.backup_id]


def _slot(doc: object, generation: int) -> bytes:
    import hashlib
    body = json.dumps(doc).encode()
    return volume_format._HEAD.pack(volume_format.MAGIC, generation, len(body),
                                    hashlib.sha256(body).digest()) + body


def test_trimming_stops_once_another_writer_took_the_lease(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trims come after the publication: a writer that took the lease over meanwhile
    may be writing into free regions already."""
    monkeypatch.setattr(volume_changes, "TRIM_CHECK", 0.0)

    class Stolen(TrimExport):
        def trim(self, count: int, offset: int) -> None:
            super().trim(count, offset)
            block = table(self)
            assert block.lease is not None
            write_table(self, replace(block, lease=Lease.mine()))  # another writer's claim

    export = Stolen(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(5)]
    report = vol.publish_changes(UUID, drop=[p.backup_id for p in points[0:4:2]])
    after = table(export)
    assert len(after.free) == 2 and len(export.trims) == 1 and report.trimmed < report.free
    assert [e["backup_id"] for e in after.entries] == [p.backup_id for p in points[1:5:2]] + [
        points[4].backup_id]


def test_free_regions_a_lost_holder_took_are_not_handed_out_again() -> None:
    """A killed writer's QEMU may still write into the free regions it took."""
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(3)]
    vol.publish_changes(UUID, drop=[points[0].backup_id])
    free = table(export).free
    lost = volume(export)
    lost.take_lease()
    taken = lost.allocate(LAYER)
    block = table(export)
    assert block.lease is not None and (taken, LAYER) in block.lease.taken
    write_table(export, replace(block, lease=replace(
        block.lease, pid=999999999 % (1 << 31), started="1", host="killed")))
    mine = backup(volume(export), 7)
    after = table(export)
    assert not overlap([(taken, LAYER)], [*after.free, *live(after)])
    assert owned(after, mine.backup_id) and free  # there was room to reuse, elsewhere


# -- a hostile free list --------------------------------------------------------------------


def _with(export: MemoryExport, **fields: object) -> None:
    write_table(export, replace(table(export), **fields))  # type: ignore[arg-type]


HOSTILE_FREE = [
    pytest.param([(DATA_START + 1, MiB)], id="unaligned"),
    pytest.param([(DATA_START, 0)], id="empty"),
    pytest.param([(0, MiB)], id="over-the-superblocks"),
    pytest.param([(DATA_START, 2 * MiB), (DATA_START + MiB, MiB)], id="overlapping"),
    pytest.param([(DATA_START + 8 * MiB, MiB), (DATA_START, MiB)], id="unsorted"),
    pytest.param([(SIZE - MiB, 2 * MiB)], id="beyond-the-end"),
    pytest.param([(DATA_START, 1 << 61)], id="huge"),
    pytest.param("live", id="over-a-live-layer"),
]


@pytest.mark.hostile
@pytest.mark.parametrize("free", HOSTILE_FREE)
def test_a_hostile_free_list_is_damage_and_never_used_or_trimmed(free: object) -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    points = [backup(vol, i) for i in range(2)]
    block = table(export)
    if free == "live":
        free = owned(block, points[0].backup_id)[:1]
    _with(export, free=free, next_free=max(block.next_free, SIZE // 2))
    generation = table(export).generation
    snapshot = bytes(export.data[2 * SLOT:])
    attempts: list[Callable[[NbdVolume], object]] = [
        NbdVolume.take_lease, lambda v: v.publish_changes(UUID, drop=[points[1].backup_id]),
        NbdVolume.trim_free]
    for attempt in attempts:
        with pytest.raises(VerificationError) as err:
            attempt(volume(export))
        assert "free list is damaged" in str(err.value) and "\n" not in str(err.value)
        assert err.value.exit_code == 5
    assert export.trims == [] and bytes(export.data[2 * SLOT:]) == snapshot
    assert table(export).generation == generation  # not even a lease was written
    assert [m.backup_id for m in volume(export).scan().backups] == [p.backup_id
                                                                     for p in points]


@pytest.mark.hostile
@pytest.mark.parametrize("regions", [
    "nope", [[DATA_START, MiB, 3]], [[DATA_START + 5, MiB]], [[True, MiB]],
    [[SIZE, MiB]], [[DATA_START, MiB]] * (MAX_REGIONS + 1)])
def test_hostile_regions_of_an_entry_are_damage(regions: object) -> None:
    export = TrimExport(SIZE)
    vol = volume(export)
    backup(vol, 1)
    block = table(export)
    _with(export, entries=[{**block.entries[0], "regions": regions}])
    problem = space_problem(table(export), SIZE)
    assert problem is not None and "\n" not in problem
    with pytest.raises(VerificationError, match="free list is damaged"):
        volume(export).take_lease()


@pytest.mark.hostile
@pytest.mark.parametrize("free", [
    "x", [[1, 2, 3]], [["a", MiB]], [[True, MiB]], [[DATA_START, MiB]] * (MAX_REGIONS + 1)])
def test_a_malformed_free_list_makes_its_slot_damaged(free: object) -> None:
    doc = {"format": "libvirt-rdm-backup/nbd-volume", "version": 1, "id": "abc123",
           "next_free": 1 << 30, "entries": [], "free": free}
    with pytest.raises(ValueError, match="malformed free list"):
        Superblock.parse(_slot(doc, 3))


@pytest.mark.hostile
@pytest.mark.parametrize("taken", ["x", [[1]], [[-1, 5]], [[1, 2]] * 5000])
def test_a_malformed_lease_region_list_is_refused(taken: object) -> None:
    doc = Lease.mine().to_dict()
    with pytest.raises(ValueError, match="malformed lease regions"):
        Lease.from_dict({**doc, "taken": taken})


# -- no fixed lifetime ----------------------------------------------------------------------


def test_thousands_of_backups_and_drops_keep_the_volume_bounded() -> None:
    """Back up, drop the oldest, for ever: the table, the pointer and the free list depend
    on the live points only (and the sequence keeps counting)."""
    export = TrimExport(SIZE, zeroes=False)
    vol = volume(export)
    kept: list[Manifest] = []
    sizes: list[int] = []
    for index in range(2500):
        kept.append(backup(vol, index))
        if len(kept) > 4:
            vol.publish_changes(UUID, drop=[kept.pop(0).backup_id])
        if index % 250 == 249:
            sizes.append(len(table(export).to_bytes()))
    block = table(export)
    assert len(block.entries) == 4
    assert max(sizes) - min(sizes) < 64 and max(sizes) < 8192
    assert block.next_free <= DATA_START + 6 * (LAYER + ALIGN)
    assert len(block.free) <= 5
    assert vol.scan().backups[-1].sequence == 2500
    with pytest.raises(NotFoundError, match="not in the volume"):
        vol.publish_changes(UUID, drop=[f"20260101T{0:06d}Z-{0:06d}"])
    vol.release_lease()
