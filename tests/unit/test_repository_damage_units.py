"""A damaged repository: unreadable manifests, missing or wrong layers, and what builds on them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup import cli
from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.plan import Facts, plan_disk
from libvirt_rdm_backup.engine.selection import choose_backup
from libvirt_rdm_backup.engine.verify import verify_lineage, verify_manifests
from libvirt_rdm_backup.errors import DamagedBackupError
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint, unusable_points
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.order import newest_damage
from libvirt_rdm_backup.repository.store import Repository

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"
IDS = ["20260101T000000Z-000001", "20260102T000000Z-000002", "20260103T000000Z-000003"]
SIZE = 1 << 30


def vdb() -> RawDisk:
    return RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                   source_path="/dev/loop9", size=SIZE, node_name="libvirt-vdb-format")


def publish(repo: Repository, backup_id: str, parent: str | None, payload: bytes,
            created: str | None = None) -> Manifest:
    """A backup of one disk whose layer holds ``payload``."""
    with repo.lock(UUID), repo.staging(UUID, backup_id) as staging:
        data = Path(staging.file("vdb.qcow2"))
        backing = ["-u", "-b", f"../{parent}/vdb.qcow2", "-F", "qcow2"] if parent else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(data),
                        str(SIZE)], check=True)  # the header a layer of this tool has
        with open(data, "ab") as stream:
            stream.write(payload)
        level = "incremental" if parent else "full"
        record = DiskRecord(disk=vdb(), size=SIZE, data_file=data.name, format="qcow2",
                            digest=file_digest(str(data)), level=level, data_path="qemu",
                            bytes_transferred=len(payload), stored_bytes=4096, parent=parent,
                            bitmap=f"bm-{backup_id[-1]}", file_size=data.stat().st_size)
        manifest = Manifest(backup_id=backup_id, domain_uuid=UUID, domain_name="vm",
                            level=level, created=created or backup_id,
                            completed=created or backup_id,
                            consistency={}, domain_xml="<domain/>", disks=[record],
                            parent=parent)
        repo.publish(staging, manifest)
    return manifest


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Repository, list[Manifest]]:
    """A repository with a full backup and two incrementals of vdb."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    manifests = [publish(repo, IDS[0], None, b"full" * 1000),
                 publish(repo, IDS[1], IDS[0], b"inc1" * 100),
                 publish(repo, IDS[2], IDS[1], b"inc2" * 100)]
    return repo, manifests


def layer(repo: Repository, backup_id: str) -> Path:
    return Path(repo.backup_dir(UUID, backup_id)) / "vdb.qcow2"


def truncate_manifest(repo: Repository, backup_id: str) -> None:
    path = Path(repo.backup_dir(UUID, backup_id)) / "manifest.json"
    os.truncate(path, path.stat().st_size // 2)


def test_scan_lists_unreadable_manifests_apart(chain: tuple[Repository, list[Manifest]]
                                                ) -> None:
    repo, _ = chain
    truncate_manifest(repo, IDS[1])
    os.unlink(Path(repo.backup_dir(UUID, IDS[2])) / "manifest.json")
    readable, damaged = repo.scan()
    assert [m.backup_id for m in readable] == [IDS[0]]
    assert [(d.backup_id, d.domain_uuid) for d in damaged] == [(IDS[1], UUID), (IDS[2], UUID)]
    assert "malformed manifest" in damaged[0].problem and "missing" in damaged[1].problem


def test_cheap_layer_checks_and_recorded_damage(chain: tuple[Repository, list[Manifest]]
                                                ) -> None:
    repo, manifests = chain
    store = FileStore(repo)
    second = manifests[1]
    record = second.disks[0]
    assert store.damage(DiskPoint(second, record)) is None
    with open(layer(repo, IDS[1]), "ab") as stream:
        stream.write(b"x")
    assert "bytes, not" in str(store.damage(DiskPoint(second, record)))
    os.truncate(layer(repo, IDS[1]), record.file_size or 0)
    with open(layer(repo, IDS[1]), "r+b") as stream:  # same size, one byte flipped
        stream.seek(-1, os.SEEK_END)
        stream.write(b"J")
    assert store.damage(DiskPoint(second, record)) is None  # a digest is not cheap
    assert "mismatch" in str(store.damage(DiskPoint(second, record), digests=True))
    assert "mismatch" in str(store.damage(DiskPoint(second, record)))  # recorded by the check
    with open(layer(repo, IDS[1]), "r+b") as stream:  # repaired
        stream.seek(-1, os.SEEK_END)
        stream.write(b"1")
    assert store.damage(DiskPoint(second, record), digests=True) is None
    assert store.damage(DiskPoint(second, record)) is None
    layer(repo, IDS[1]).unlink()
    assert store.damage(DiskPoint(second, record)) == "vdb.qcow2 is missing"


def test_unusable_points_name_the_root_cause(chain: tuple[Repository, list[Manifest]]
                                             ) -> None:
    repo, manifests = chain
    store = FileStore(repo)
    layer(repo, IDS[1]).unlink()

    def problem(point: DiskPoint) -> str | None:
        return store.damage(DiskPoint(point.manifest, point.record))

    why = unusable_points(manifests, "vdb", problem, {})
    assert set(why) == {IDS[1], IDS[2]}
    assert why[IDS[1]] == "vdb.qcow2 is missing"
    assert why[IDS[2]] == f"builds on backup {IDS[1]}, which is damaged: vdb.qcow2 is missing"
    only_last = unusable_points([manifests[0], manifests[2]], "vdb", lambda p: None,
                                {IDS[1]: "malformed manifest"})
    assert only_last == {IDS[2]: f"builds on backup {IDS[1]}, which is damaged: "
                                 "malformed manifest"}
    assert "missing" in unusable_points([manifests[2]], "vdb", lambda p: None, {})[IDS[2]]


def facts(manifests: list[Manifest], unusable: dict[str, str], *live: str,
          damaged_newer: tuple[str, str] | None = None) -> Facts:
    return Facts(True, Chain("default", manifests), {"libvirt-vdb-format": set(live)},
                 unusable={"vdb": unusable}, damaged_newer=damaged_newer)


def test_plans_never_build_on_a_damaged_point(chain: tuple[Repository, list[Manifest]]
                                              ) -> None:
    _repo, manifests = chain
    broken = {IDS[1]: "vdb.qcow2 is missing",
              IDS[2]: f"builds on backup {IDS[1]}, which is damaged: vdb.qcow2 is missing"}
    the_facts = facts(manifests, broken, "bm-1", "bm-3")
    for level in ("incremental", "resync"):
        with pytest.raises(DamagedBackupError) as err:
            plan_disk(vdb(), level, the_facts)
        assert err.value.exit_code == 5 and err.value.disk == "vdb"
        assert err.value.backup_id == IDS[2] and "--level auto" in str(err.value)
    differential = plan_disk(vdb(), "differential", the_facts)  # the full is intact
    assert differential.parent is not None and differential.parent.backup_id == IDS[0]
    auto = plan_disk(vdb(), "auto", the_facts)
    assert auto.level == "incremental" and auto.source_bitmap == "bm-1"
    assert auto.parent is not None and auto.parent.backup_id == IDS[0]
    assert f"backup {IDS[2]} of vdb is unusable" in auto.reason


def test_auto_falls_back_to_the_tracking_of_the_last_usable_full(
        chain: tuple[Repository, list[Manifest]]) -> None:
    _repo, manifests = chain
    the_facts = facts(manifests, {IDS[2]: "vdb.qcow2: sha256 mismatch"}, "bm-1", "bm-3")
    plan = plan_disk(vdb(), "auto", the_facts)  # the second point's bitmap is gone
    assert plan.level == "differential" and plan.source_bitmap == "bm-1"
    assert "last usable full backup" in plan.reason and "sha256 mismatch" in plan.reason
    nothing = facts(manifests, dict.fromkeys(IDS, "gone"), "bm-1", "bm-3")
    full = plan_disk(vdb(), "auto", nothing)
    assert full.level == "full" and "no usable backup of vdb" in full.reason


def test_a_damaged_newer_backup_stops_explicit_levels(
        chain: tuple[Repository, list[Manifest]]) -> None:
    _repo, manifests = chain
    newer = ("20260104T000000Z-000004", "malformed manifest: x")
    the_facts = facts(manifests, {}, "bm-1", "bm-3", damaged_newer=newer)
    with pytest.raises(DamagedBackupError, match=newer[0]):
        plan_disk(vdb(), "incremental", the_facts)
    plan = plan_disk(vdb(), "auto", the_facts)
    assert plan.parent is not None and plan.parent.backup_id == IDS[2]
    assert newer[0] in plan.reason


def test_verify_and_restore_name_the_damaged_backup(chain: tuple[Repository, list[Manifest]]
                                                    ) -> None:
    repo, manifests = chain
    store = FileStore(repo)
    truncate_manifest(repo, IDS[1])
    report = verify_manifests(store, store.scan().backups, store.scan().damaged)
    assert [(c.backup_id, c.disk, c.ok) for c in report.checks] == [
        (IDS[0], "vdb", True), (IDS[1], None, False), (IDS[2], "vdb", False)]
    assert f"builds on backup {IDS[1]}, which is damaged" in str(report.checks[2].problem)
    with pytest.raises(DamagedBackupError, match=IDS[1]) as err:
        choose_backup(store, "vm", IDS[1])
    assert err.value.exit_code == 5
    with pytest.raises(DamagedBackupError, match=f"backup {IDS[2]} disk vdb: builds on"):
        verify_lineage(store, manifests[2], "vdb")
    truncate_manifest(repo, IDS[2])
    with pytest.raises(DamagedBackupError, match="newest"):
        choose_backup(store, "vm", None)  # never an older point unasked
    assert choose_backup(store, UUID, IDS[0]).backup_id == IDS[0]


def test_verify_reports_a_chain_made_within_one_second_oldest_first(tmp_path: Path) -> None:
    """Ids of one second sort by their random part; the report follows creation instead."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    first, second = "20260101T000000Z-ffffff", "20260101T000000Z-000000"
    publish(repo, first, None, b"full" * 1000, created="2026-01-01T00:00:00.100Z")
    publish(repo, second, first, b"inc1" * 100, created="2026-01-01T00:00:00.900Z")
    layer(repo, first).unlink()
    store = FileStore(repo)
    report = verify_manifests(store, store.scan().backups, store.scan().damaged)
    assert [(c.backup_id, c.ok) for c in report.checks] == [(first, False), (second, False)]
    assert "vdb.qcow2 is missing" in str(report.checks[0].problem)
    assert f"builds on backup {first}" in str(report.checks[1].problem)


def test_list_shows_the_readable_backups_and_names_the_damaged_one(
        chain: tuple[Repository, list[Manifest]], capsys: pytest.CaptureFixture[str]) -> None:
    repo, _ = chain
    truncate_manifest(repo, IDS[1])
    assert cli.main(["list", "--target", repo.root]) == 5
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == [IDS[0], IDS[2]]
    assert err.count("\n") == 1 and IDS[1] in err and "damaged" in err
    assert cli.main(["verify", "--target", repo.root]) == 5
    _out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"backup {IDS[1]}:" in err


def test_a_missing_chunk_map_makes_a_layer_unusable(chain: tuple[Repository, list[Manifest]]
                                                    ) -> None:
    repo, manifests = chain
    store = FileStore(repo)
    second = manifests[1]
    record = dataclasses.replace(second.disks[0], chunk_map="vdb.chunks")
    assert store.damage(DiskPoint(second, record)) == "chunk map vdb.chunks is missing"
    (Path(repo.backup_dir(UUID, IDS[1])) / "vdb.chunks").write_bytes(b"")
    assert store.damage(DiskPoint(second, record)) is None


def test_a_damaged_backup_of_the_same_second_counts_as_newer_unless_built_on(
        tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    full, inc = "20260101T000000Z-ffffff", "20260101T000000Z-000000"
    publish(repo, full, None, b"full" * 1000, created="2026-01-01T00:00:00.100Z")
    publish(repo, inc, full, b"inc1" * 100, created="2026-01-01T00:00:00.900Z")
    truncate_manifest(repo, full)  # older, though its id sorts after the readable one
    store = FileStore(repo)
    assert newest_damage({full}, store.scan().backups) is None
    assert choose_backup(store, "vm", None).backup_id == inc
    assert newest_damage({"20260101T000000Z-000001"}, store.scan().backups) is not None
    assert newest_damage({"20251231T235959Z-ffffff"}, store.scan().backups) is None
    assert newest_damage({"20260101T000001Z-000000"}, store.scan().backups) is not None
    assert newest_damage({"x"}, []) == "x"


def test_a_layer_whose_header_names_another_file_is_damage(
        chain: tuple[Repository, list[Manifest]], tmp_path: Path) -> None:
    """Even with a manifest digest that matches the hostile layer, the header decides."""
    repo, manifests = chain
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"\x5a" * 65536)
    path = layer(repo, IDS[1])
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(outside), "-F", "raw",
                    str(path)], check=True)
    record = dataclasses.replace(manifests[1].disks[0], digest=file_digest(str(path)),
                                 file_size=path.stat().st_size)
    second = dataclasses.replace(manifests[1], disks=[record])
    store = FileStore(repo)
    problem = store.damage(DiskPoint(second, record), digests=True)
    assert problem == (f"vdb.qcow2 names backing file '{outside}', the manifest implies "
                       f"'../{IDS[0]}/vdb.qcow2'")
    assert str(store.damage(DiskPoint(second, record))).startswith(problem)  # and recorded
    with pytest.raises(DamagedBackupError) as caught:
        verify_lineage(store, manifests[2], "vdb")
    assert str(outside) in str(caught.value) and IDS[2] in str(caught.value)
    forged = dataclasses.replace(record, backing_file="/etc/shadow")
    assert "the manifest names backing file '/etc/shadow'" in str(
        store.damage(DiskPoint(second, forged), digests=True))


@pytest.mark.hostile
def test_a_manifest_that_is_a_fifo_or_a_symlink_is_damage_never_opened(tmp_path: Path) -> None:
    """A FIFO would block a listing forever, a symlink would show another file's bytes."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a manifest"}')
    ids = ["20261125T143000Z-aaaaaa", "20261125T143100Z-bbbbbb", "20261125T143200Z-cccccc"]
    for backup_id in ids:
        publish(repo, backup_id, None, b"x" * 100)
    fifo = Path(repo.root) / UUID / ids[1] / "manifest.json"
    fifo.unlink()
    os.mkfifo(fifo)
    link = Path(repo.root) / UUID / ids[2] / "manifest.json"
    link.unlink()
    link.symlink_to(secret)
    listed, damaged = repo.scan(UUID)
    assert [m.backup_id for m in listed] == ids[:1]
    assert sorted(d.backup_id for d in damaged) == ids[1:]
    assert all("not a regular file" in d.problem or "Too many levels" in d.problem
               for d in damaged), damaged


@pytest.mark.hostile
def test_a_damage_record_that_is_a_symlink_shows_nothing_of_its_target(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash")
    manifest = publish(repo, "20261125T143000Z-aaaaaa", None, b"x" * 100)
    (Path(repo.root) / UUID / manifest.backup_id / "vdb.damaged").symlink_to(secret)
    mark = repo.damage_mark(manifest, "vdb")
    assert mark is not None and "hash" not in mark and "unreadable" in mark
