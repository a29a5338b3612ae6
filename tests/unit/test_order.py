"""The order of backups comes from sequence numbers and parent links, never from the clock."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.selection import choose_backup
from libvirt_rdm_backup.engine.verify import verify_manifests
from libvirt_rdm_backup.engine.volume_store import VolumeStore
from libvirt_rdm_backup.errors import DamagedBackupError, RepositoryError, VerificationError
from libvirt_rdm_backup.repository.chain import chain_of
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.ids import new_backup_id
from libvirt_rdm_backup.repository.manifest import MAX_SEQUENCE, DiskRecord, Manifest
from libvirt_rdm_backup.repository.order import in_order, newest, newest_damage, next_sequence
from libvirt_rdm_backup.repository.store import Damage, Repository
from tests.unit.test_repository_damage_units import UUID, layer, publish, truncate_manifest, vdb
from tests.unit.test_volume_damage import MemoryExport, volume

# taken with the clock a day ahead, then right, then a day behind
AHEAD, RIGHT, BEHIND = ("20260102T120000Z-aaaaaa", "20260101T120000Z-bbbbbb",
                        "20251231T120000Z-cccccc")
CREATED = {AHEAD: "2026-01-02T12:00:00.000Z", RIGHT: "2026-01-01T12:00:00.000Z",
           BEHIND: "2025-12-31T12:00:00.000Z"}


def manifest(backup_id: str, parent: str | None, sequence: int | None,
             chain: str = "default") -> Manifest:
    record = DiskRecord(disk=vdb(), size=1 << 30, data_file="vdb.qcow2", format="qcow2",
                        digest=Digest("sha256", "0" * 64),
                        level="incremental" if parent else "full", data_path="qemu",
                        bytes_transferred=0, stored_bytes=0, parent=parent)
    created = CREATED.get(backup_id, backup_id)
    return Manifest(backup_id=backup_id, domain_uuid=UUID, domain_name="vm",
                    level=record.level, created=created, completed=created, consistency={},
                    domain_xml="<domain/>", disks=[record], chain=chain, parent=parent,
                    sequence=sequence)


def ids(items: list[Manifest]) -> list[str]:
    return [m.backup_id for m in items]


def skewed_chain(sequenced: bool = True) -> list[Manifest]:
    return [manifest(AHEAD, None, 1 if sequenced else None),
            manifest(RIGHT, AHEAD, 2 if sequenced else None),
            manifest(BEHIND, RIGHT, 3 if sequenced else None)]


def test_a_skewed_clock_changes_neither_the_order_nor_the_newest() -> None:
    chain = skewed_chain()
    for _ in range(5):
        shuffled = random.sample(chain, len(chain))
        assert ids(in_order(shuffled)) == [AHEAD, RIGHT, BEHIND]
        assert newest(shuffled) is chain[2]
    built = chain_of(random.sample(chain, 3), "default")
    assert built.last is chain[2]
    point = built.last_point("vdb")
    assert point is not None and point.backup_id == BEHIND
    assert built.needed_bitmaps() == set()  # (no bitmaps in these records)


def test_sequence_orders_backups_that_do_not_build_on_each_other() -> None:
    # two chains of one domain: no parent links between them, the clock went back
    daily = manifest(AHEAD, None, 1, chain="daily")
    weekly = manifest(RIGHT, None, 2, chain="weekly")
    assert ids(in_order([weekly, daily])) == [AHEAD, RIGHT]
    assert newest([daily, weekly]) is weekly


def test_old_manifests_without_sequence_keep_the_old_rule_and_go_first() -> None:
    old_full = manifest("20250101T000000Z-000001", None, None)
    old_inc = manifest("20250102T000000Z-000002", old_full.backup_id, None)
    new_inc = manifest("20240101T000000Z-000003", old_inc.backup_id, 1)  # clock far behind
    other = manifest("20200101T000000Z-000004", None, 2, chain="other")
    assert ids(in_order([other, new_inc, old_inc, old_full])) == [
        old_full.backup_id, old_inc.backup_id, new_inc.backup_id, other.backup_id]


def test_parent_links_order_old_manifests_taken_with_a_skewed_clock() -> None:
    # unsequenced (written before sequences existed) and taken with skewed clocks:
    # the id and ``created`` say the opposite of the parent links; the links win
    assert ids(in_order(list(reversed(skewed_chain(sequenced=False))))) == [
        AHEAD, RIGHT, BEHIND]


def test_a_loop_of_parent_links_does_not_hang() -> None:
    first = manifest(AHEAD, BEHIND, 1)
    second = manifest(BEHIND, AHEAD, 2)
    assert ids(in_order([second, first])) == [AHEAD, BEHIND]


def test_damage_newer_than_the_newest_readable_comes_from_sequence() -> None:
    readable = skewed_chain()[:2]  # AHEAD (1), RIGHT (2)
    # the third backup, taken with the clock behind, lost its manifest: its id is the
    # oldest of all, yet it is the newest backup
    assert newest_damage([Damage(UUID, BEHIND, "unreadable", 3)], readable) == BEHIND
    # an unreadable backup of the clock ahead, that the newest one does not build on,
    # is still older than it by sequence
    lost = "20260103T000000Z-dddddd"
    assert newest_damage([Damage(UUID, lost, "unreadable", 1)], [readable[1]]) is None
    # one that a readable backup builds on is older, whatever its id says
    assert newest_damage([Damage(UUID, AHEAD, "unreadable")], readable[1:]) is None
    # no sequence known: the second of the id decides, as before sequences
    assert newest_damage([Damage(UUID, lost, "unreadable")], readable[1:]) == lost
    assert newest_damage([Damage(UUID, BEHIND, "unreadable")], readable[1:]) is None


def test_a_manifest_with_a_bad_sequence_is_malformed() -> None:
    document = manifest(AHEAD, None, 1).to_dict()
    assert Manifest.from_dict(document).sequence == 1
    for bad in ("1", 0, -1, True, 1.5, 1 << 63, MAX_SEQUENCE + 1):
        with pytest.raises(RepositoryError, match="sequence"):
            Manifest.from_dict({**document, "sequence": bad})
    del document["sequence"]
    assert Manifest.from_dict(document).sequence is None  # written before sequences


def test_the_repository_numbers_backups_in_publish_order(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    for backup_id, parent in ((AHEAD, None), (RIGHT, AHEAD), (BEHIND, RIGHT)):
        publish(repo, backup_id, parent, backup_id.encode() * 100, created=CREATED[backup_id])
    store = FileStore(repo)
    listed = store.scan().backups
    assert [(m.backup_id, m.sequence) for m in listed] == [(AHEAD, 1), (RIGHT, 2), (BEHIND, 3)]
    assert (Path(repo.root) / "sequence").read_text() == "3\n"
    assert choose_backup(store, "vm", None).backup_id == BEHIND
    layer(repo, RIGHT).unlink()  # the report names the damaged layer before what builds on it
    report = verify_manifests(store, store.scan().backups, store.scan().damaged)
    assert [(c.backup_id, c.ok) for c in report.checks] == [
        (AHEAD, True), (RIGHT, False), (BEHIND, False)]


def test_an_unreadable_newest_backup_keeps_its_place(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    for backup_id, parent in ((AHEAD, None), (RIGHT, AHEAD), (BEHIND, RIGHT)):
        publish(repo, backup_id, parent, backup_id.encode() * 100, created=CREATED[backup_id])
    truncate_manifest(repo, BEHIND)  # its id is the oldest; it is the newest backup
    store = FileStore(repo)
    assert [(d.backup_id, d.sequence) for d in store.scan().damaged] == [(BEHIND, 3)]
    with pytest.raises(DamagedBackupError, match="newest"):
        choose_backup(store, "vm", None)  # never the older RIGHT unasked
    assert choose_backup(store, "vm", RIGHT).backup_id == RIGHT
    # the next sequence is past the unreadable one's
    later = "20251230T000000Z-eeeeee"
    assert publish(repo, later, AHEAD, b"x" * 100).sequence == 4


def test_old_backups_without_sequence_come_before_new_ones(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    old = "20270101T000000Z-000001"  # written before sequences, by a clock that was ahead
    publish(repo, old, None, b"old" * 100)
    path = Path(repo.backup_dir(UUID, old))
    document = json.loads((path / "manifest.json").read_text())
    del document["sequence"]
    (path / "manifest.json").write_text(json.dumps(document))
    (path / "sequence").unlink()
    (Path(repo.root) / "sequence").unlink()
    new = publish(repo, RIGHT, None, b"new" * 100)
    assert new.sequence == 1
    assert ids(repo.scan(UUID).backups) == [old, RIGHT]
    assert choose_backup(FileStore(repo), "vm", None).backup_id == RIGHT


def test_the_volume_numbers_backups_in_publish_order() -> None:
    export = MemoryExport(64 << 20)
    vol = volume(export)
    for backup_id, parent in ((AHEAD, None), (RIGHT, AHEAD), (BEHIND, RIGHT)):
        vol.publish(dataclasses.replace(manifest(backup_id, parent, None),
                                        disks=[dataclasses.replace(
                                            manifest(backup_id, parent, None).disks[0],
                                            location={"offset": vol.allocate(1 << 20),
                                                      "region": 1 << 20, "length": 0})]))
    again = volume(export)
    assert [(m.backup_id, m.sequence) for m in again.scan()[0]] == [
        (AHEAD, 1), (RIGHT, 2), (BEHIND, 3)]
    assert [e["sequence"] for e in again.superblock.entries] == [1, 2, 3]
    assert choose_backup(VolumeStore(again), "vm", None).backup_id == BEHIND


def test_a_volume_entry_and_its_manifest_must_agree_on_the_sequence() -> None:
    export = MemoryExport(64 << 20)
    vol = volume(export)
    vol.publish(manifest(AHEAD, None, None))
    vol.superblock.entries[0]["sequence"] = 7  # as a hostile table of contents would say
    found, damaged = vol.scan()
    assert found == [] and [(d.backup_id, d.sequence) for d in damaged] == [(AHEAD, 7)]
    assert "sequence" in damaged[0].problem


class _EndsWith:
    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __contains__(self, item: object) -> bool:
        return str(item).endswith(self.suffix)


def test_new_ids_avoid_the_ids_already_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    suffixes = iter(["000001", "000001", "000002"])
    monkeypatch.setattr("secrets.token_hex", lambda _n: next(suffixes))
    # a clock set back may name the second of an existing backup again
    assert new_backup_id(_EndsWith("-000001")).endswith("-000002")


def test_a_planted_highest_sequence_is_refused_not_overflowed() -> None:
    assert next_sequence([None, 3, 1]) == 4
    assert next_sequence([MAX_SEQUENCE - 1]) == MAX_SEQUENCE
    with pytest.raises(VerificationError, match="altered"):
        next_sequence([MAX_SEQUENCE])


def test_a_number_too_long_to_parse_is_a_malformed_manifest() -> None:
    text = manifest(AHEAD, None, 1).dumps().replace('"sequence": 1', '"sequence": ' + "9" * 5000)
    assert "9" * 5000 in text
    with pytest.raises(RepositoryError, match="malformed manifest"):
        Manifest.loads(text)
