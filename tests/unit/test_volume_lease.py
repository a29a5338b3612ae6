"""The writer lease of an NBD volume and the bounded reading of its structures (export in memory).

Two writers of one export are two :class:`NbdVolume` objects on one
:class:`MemoryExport`: what two backups pushing to one served volume file see,
whatever address each reaches it by.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from dataclasses import replace

import pytest

from libvirt_rdm_backup.errors import OperationError, RdmBackupError, VerificationError
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST
from libvirt_rdm_backup.targets.lease import Lease
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_format import _HEAD, MAGIC, SLOT, Superblock, read_table
from tests.unit.test_volume_damage import SIZE, MemoryExport, publish_to, volume


class CountingExport(MemoryExport):
    """Remembers the largest read asked for."""

    largest = 0

    def pread(self, count: int, offset: int) -> bytes:
        self.largest = max(self.largest, count)
        return super().pread(count, offset)


def test_a_second_writer_is_refused_while_the_first_holds_the_lease() -> None:
    export = MemoryExport(SIZE)
    first, second = volume(export), volume(export)
    first.take_lease()
    with pytest.raises(OperationError, match="is being written by another backup") as err:
        second.take_lease()
    assert err.value.exit_code == 4 and "\n" not in str(err.value)
    publish_to(first, 1)  # publishing releases the lease
    second.take_lease()
    second.release_lease()


def test_simultaneous_claims_leave_exactly_one_writer() -> None:
    export = MemoryExport(SIZE)
    writers = [volume(export) for _ in range(4)]
    for writer in writers:
        writer.settle = 0.2
    outcomes: list[str] = []

    def claim(vol: NbdVolume) -> None:
        try:
            vol.take_lease()
            outcomes.append("won")
        except OperationError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=claim, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("won") == 1, outcomes
    winner = next(w for w in writers if w._lease is not None)
    publish_to(winner, 1)
    assert len(volume(export).superblock.entries) == 1


def test_a_lease_taken_over_before_publish_fails_the_publish() -> None:
    """The other writer takes the lease between this backup's start and its publication."""
    export = MemoryExport(SIZE)
    kept = publish_to(volume(export), 1)
    slow, fast = volume(export), volume(export)
    slow.take_lease()
    slow.allocate(1 << 20)  # its layers go here
    # the other writer overwrites the lease (as one whose claim landed late, or a
    # takeover of a lease it judged dead) and publishes a backup of its own
    table = read_table(export, "mem")
    assert table is not None
    stolen = replace(table, generation=table.generation + 1, lease=Lease.mine())
    export.pwrite(stolen.to_bytes(), 0 if stolen.generation % 2 == 0 else SLOT)
    fast.superblock, fast.next_free = stolen, stolen.next_free
    fast._lease = stolen.lease
    theirs = publish_to(fast, 1)
    with pytest.raises(OperationError, match="lost its writer lease") as err:
        publish_to(slow, 1)
    assert err.value.exit_code == 4
    listed = [e["backup_id"] for e in volume(export).superblock.entries]
    assert listed == [kept[0].backup_id, theirs[0].backup_id]
    readable, damaged = volume(export).scan()
    assert [m.backup_id for m in readable] == listed and not damaged


def test_a_renewal_after_the_lease_moved_fails_too() -> None:
    export = MemoryExport(SIZE)
    mine, other = volume(export), volume(export)
    mine.take_lease()
    table = read_table(export, "mem")
    assert table is not None
    moved = replace(table, generation=table.generation + 1,
                    lease=replace(Lease.mine(), host="hv2", node="other-boot/1"))
    export.pwrite(moved.to_bytes(), 0 if moved.generation % 2 == 0 else SLOT)
    with pytest.raises(OperationError, match="lost its writer lease"):
        mine.renew_lease()
    with pytest.raises(OperationError, match="being written by another backup"):
        other.take_lease()  # the new holder's lease stands


def held_by(export: MemoryExport, lease: Lease) -> None:
    table = read_table(export, "mem")
    assert table is not None
    claim = replace(table, generation=table.generation + 1, lease=lease)
    export.pwrite(claim.to_bytes(), 0 if claim.generation % 2 == 0 else SLOT)


def test_the_lease_of_a_killed_writer_on_this_host_is_taken_at_once() -> None:
    export = MemoryExport(SIZE)
    volume(export)
    child = subprocess.Popen(["sleep", "0"])
    child.wait()  # its pid now names no process
    held_by(export, replace(Lease.mine(), pid=child.pid, started="1"))
    vol = volume(export)
    vol.take_lease()
    publish_to(vol, 1)
    assert volume(export).superblock.lease is None


def test_a_lease_this_process_could_not_release_does_not_block_it() -> None:
    export = MemoryExport(SIZE)
    volume(export)
    held_by(export, Lease.mine())  # this pid, never held: left by an earlier failed run
    vol = volume(export)
    vol.take_lease()
    vol.release_lease()


def test_a_remote_lease_blocks_until_expired_and_unrenewed() -> None:
    export = MemoryExport(SIZE)
    volume(export)
    remote = replace(Lease.mine(ttl=0.4), host="hv2", node="other-boot/1")
    held_by(export, replace(remote, renewed="2999-01-01T00:00:00.000Z"))
    with pytest.raises(OperationError, match="host hv2"):
        volume(export).take_lease()
    held_by(export, replace(remote, renewed="2000-01-01T00:00:00.000Z"))
    vol = volume(export)
    vol.take_lease()  # watched it stay unrenewed for half its ttl, then took it
    assert vol.superblock.lease is not None and vol.superblock.lease.host != "hv2"
    vol.release_lease()


def test_older_volumes_without_a_lease_are_read_and_written() -> None:
    export = MemoryExport(SIZE)
    body = json.dumps({"format": "libvirt-rdm-backup/nbd-volume", "version": 1, "id": "0ld1d5",
                       "next_free": 2 << 20, "entries": []}).encode()
    export.pwrite(_HEAD.pack(MAGIC, 7, len(body), hashlib.sha256(body).digest()) + body, SLOT)
    vol = volume(export)
    assert vol.repo_id == "0ld1d5" and vol.superblock.lease is None
    publish_to(vol, 1)
    listed = [e["backup_id"] for e in volume(export).superblock.entries]
    assert listed == ["20260101T000000Z-000000"]


# -- bounded, validated reads of what a volume holds ------------------------------------------

def slot_with(doc: object, length: int | None = None, generation: int = 3) -> bytes:
    body = json.dumps(doc).encode()
    size = len(body) if length is None else length
    return _HEAD.pack(MAGIC, generation, size, hashlib.sha256(body).digest()) + body


GOOD = {"format": "libvirt-rdm-backup/nbd-volume", "version": 1, "id": "abc123",
        "next_free": 2 << 20, "entries": []}


@pytest.mark.bad_input
@pytest.mark.parametrize("slot", [
    slot_with(GOOD, length=1 << 62),
    slot_with(GOOD, generation=1 << 63),
    slot_with({**GOOD, "next_free": 1 << 70}),
    slot_with({**GOOD, "next_free": 3}),
    slot_with({**GOOD, "entries": {"a": 1}}),
    slot_with({**GOOD, "entries": [1] * 1000}),
    slot_with({**GOOD, "id": "../../x"}),
    slot_with({**GOOD, "version": 10 ** 100}),
    slot_with({**GOOD, "lease": {"token": "x"}}),
    slot_with({**GOOD, "lease": {**Lease.mine().to_dict(), "host": "h\nrdm-backup: ok"}}),
    MAGIC + bytes(100),
], ids=["huge-length", "huge-generation", "huge-pointer", "unaligned-pointer", "entries-object",
        "entries-not-objects", "bad-id", "huge-version", "bad-lease", "lease-host-with-newline",
        "bad-checksum"])
def test_hostile_table_of_contents_is_damage(slot: bytes) -> None:
    export = CountingExport(SIZE)
    export.pwrite(slot, 0)
    with pytest.raises(VerificationError, match="table of contents is damaged") as err:
        read_table(export, "nbd://h/x")
    assert err.value.exit_code == 5
    assert export.largest <= SLOT


@pytest.mark.bad_input
@pytest.mark.parametrize("place", [[2 << 20, 1 << 62], [1 << 62, 10], [0, 100], [2 << 20, 0],
                                   "x", [2 << 20], [2 << 20, MAX_MANIFEST + 1], [True, 5]])
def test_hostile_manifest_places_are_damage_and_never_read(place: object) -> None:
    export = CountingExport(SIZE)
    vol = volume(export)
    publish_to(vol, 1)
    table = read_table(export, "mem")
    assert table is not None
    entries = [{**table.entries[0], "manifest": place}]
    export.pwrite(Superblock(table.volume_id, table.generation + 1, table.next_free,
                             entries).to_bytes(), 0 if table.generation % 2 else SLOT)
    export.largest = 0
    readable, damaged = volume(export).scan()
    assert readable == [] and len(damaged) == 1 and "outside the volume" in damaged[0].problem
    assert export.largest <= SLOT


@pytest.mark.bad_input
@pytest.mark.parametrize("location", [
    {"offset": 1 << 62, "region": 1 << 20, "length": 0},
    {"offset": 2 << 20, "region": 1 << 62, "length": 0},
    {"offset": 0, "region": 1 << 20, "length": 0},
    {"offset": 2 << 20, "region": 1 << 20, "length": 2 << 20},
    {"offset": "2097152", "region": 1 << 20, "length": 0},
    None,
])
def test_hostile_layer_locations_are_damage(location: object) -> None:
    from libvirt_rdm_backup.engine.volume_store import VolumeStore

    export = CountingExport(SIZE)
    vol = volume(export)
    manifest = publish_to(vol, 1)[0]
    record = replace(manifest.disks[0], location=location)  # type: ignore[arg-type]
    store = VolumeStore(vol)
    export.largest = 0
    assert "location" in str(store.damage(DiskPoint(manifest, record)))
    assert "location" in str(store.damage(DiskPoint(manifest, record), digests=True))
    with pytest.raises(RdmBackupError) as err:
        store.image_node([DiskPoint(manifest, record)])
    assert err.value.exit_code == 5
    assert export.largest <= SLOT


def test_a_taker_allocates_past_what_a_lost_holder_may_still_write() -> None:
    """The killed holder's QEMU may still write into the regions it took: they are skipped."""
    export = MemoryExport(SIZE)
    kept = publish_to(volume(export), 1)
    lost = volume(export)
    lost.take_lease()
    regions = [lost.allocate(4 << 20) for _ in range(2)]  # each recorded in the lease first
    table = read_table(export, "mem")
    assert table is not None and table.lease is not None
    assert table.lease.reserved == regions[-1] + (4 << 20) > table.next_free
    held_by(export, replace(table.lease, pid=999999999 % (1 << 31), started="1",
                            host="killed"))  # as left by the killed holder
    taker = volume(export)
    taker.take_lease()
    assert taker.allocate(1 << 20) >= regions[-1] + (4 << 20)
    theirs = publish_to(taker, 1)
    listed = [e["backup_id"] for e in volume(export).superblock.entries]
    assert listed == [kept[0].backup_id, theirs[0].backup_id]
    assert volume(export).superblock.next_free > regions[-1]


@pytest.mark.hostile
def test_one_listing_reads_a_bounded_number_of_manifest_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many large manifests (a hostile server's cheap answer) are not all read and held."""
    from libvirt_rdm_backup.targets import nbd_volume

    export = MemoryExport(SIZE)
    vol = volume(export)
    first, second = publish_to(vol, 2)
    entry = vol.superblock.entries[0]
    monkeypatch.setattr(nbd_volume, "MAX_LISTING", entry["manifest"][1])
    listed, damaged = vol.scan()
    assert [m.backup_id for m in listed] == [first.backup_id]
    assert [d.backup_id for d in damaged] == [second.backup_id]
    assert "beyond the manifest bytes one listing reads" in damaged[0].problem
