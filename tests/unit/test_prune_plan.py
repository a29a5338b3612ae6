"""Prune plans: the rules' decisions per chain, and the points that stay whatever they say."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.engine import prune_plan
from libvirt_rdm_backup.engine.prune_plan import ChainPlan, plan_prune
from libvirt_rdm_backup.errors import NotFoundError, UsageError
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.order import in_order
from libvirt_rdm_backup.repository.retention import RetentionPolicy
from libvirt_rdm_backup.repository.store import Damage, Repository, Scan
from tests.unit.test_repository_damage_units import publish

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"
OTHER = "7d0e5c4b-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
LAST_1 = RetentionPolicy(keep_last=1)


def record(target: str, level: str, parent: str | None) -> DiskRecord:
    disk = RawDisk(target=target, source_kind=SourceKind.BLOCK, device="disk",
                   source_path=f"/dev/{target}")
    return DiskRecord(disk=disk, size=1 << 20, data_file=f"{target}.qcow2", format="qcow2",
                      digest=Digest("sha256", "0" * 64), level=level, data_path="qemu",
                      bytes_transferred=0, stored_bytes=0, parent=parent,
                      bitmap=f"bm-{target}")


@dataclass
class FakeStore:
    """A store holding manifests; ``broken``: (backup id, disk) -> what is wrong."""

    backups: list[Manifest] = field(default_factory=list)
    damaged: list[Damage] = field(default_factory=list)
    broken: dict[tuple[str, str], str] = field(default_factory=dict)
    name: str = "fake"
    self_contained: bool = False
    sequence: int = 0

    def add(self, day: int, levels: dict[str, str], chain: str = "default",
            uuid: str = UUID, name: str = "vm", created: str | None = None) -> Manifest:
        """A backup made on December ``day`` at noon of the disks in ``levels``."""
        self.sequence += 1
        backup_id = f"202612{day:02d}T120000Z-{self.sequence:06x}"
        mine = [m for m in self.backups if m.chain == chain and m.domain_uuid == uuid]
        records = []
        for target, level in levels.items():
            before = next((m for m in reversed(mine) if m.disk(target)), None)
            full = next((m for m in reversed(mine) if (r := m.disk(target)) and
                         r.level == "full"), None)
            parent = {"full": None, "incremental": before, "differential": full}[level]
            records.append(record(target, level, parent.backup_id if parent else None))
        manifest = Manifest(
            backup_id=backup_id, domain_uuid=uuid, domain_name=name,
            level=records[0].level, created=created or f"2026-12-{day:02d}T12:00:00.000Z",
            completed="", consistency={}, domain_xml="", disks=records, chain=chain,
            parent=mine[-1].backup_id if mine else None, sequence=self.sequence)
        self.backups.append(manifest)
        return manifest

    def scan(self, domain_uuid: str | None = None) -> Scan:
        return Scan(in_order(m for m in self.backups if domain_uuid in (None, m.domain_uuid)),
                    [d for d in self.damaged if domain_uuid in (None, d.domain_uuid)])

    def damage(self, point: DiskPoint, digests: bool = False) -> str | None:
        return self.broken.get((point.backup_id, point.record.disk.target))


def decisions(plan: ChainPlan) -> list[tuple[str, str | None, str | None]]:
    return [(p.action, p.rule, p.protected) for p in plan.points]


def only(plans: list[ChainPlan]) -> ChainPlan:
    assert len(plans) == 1
    return plans[0]


def test_the_newest_and_the_full_differentials_build_on_stay() -> None:
    store = FakeStore()
    store.add(1, {"vdb": "full"})
    for day in (2, 3, 4):
        store.add(day, {"vdb": "incremental"})
    plan = only(plan_prune(store, "vm", None, LAST_1))  # type: ignore[arg-type]
    assert decisions(plan) == [
        ("keep", None, "next differential of vdb builds on it"),
        ("drop", None, None), ("drop", None, None),
        ("keep", "last 1", "newest of chain; next incremental of vdb builds on it")]
    assert [p.backup_id for p in plan.dropped] == [m.backup_id for m in store.backups[1:3]]
    assert (plan.domain_uuid, plan.domain_name, plan.chain) == (UUID, "vm", "default")


def test_points_that_are_complete_images_keep_only_the_newest() -> None:
    """An rbd:// target: a differential is written over the newest point, so the full
    it would count from need not stay."""
    store = FakeStore(self_contained=True)
    store.add(1, {"vdb": "full"})
    for day in (2, 3):
        store.add(day, {"vdb": "incremental"})
    plan = only(plan_prune(store, "vm", None, LAST_1))  # type: ignore[arg-type]
    assert decisions(plan) == [
        ("drop", None, None), ("drop", None, None),
        ("keep", "last 1", "newest of chain; next incremental of vdb builds on it")]


def test_a_differential_chain_keeps_its_last_full_not_an_older_one() -> None:
    store = FakeStore()
    store.add(1, {"vdb": "full"})
    store.add(2, {"vdb": "differential"})
    store.add(3, {"vdb": "full"})
    store.add(4, {"vdb": "differential"})
    store.add(5, {"vdb": "differential"})
    plan = only(plan_prune(store, UUID, None, LAST_1))  # type: ignore[arg-type]
    assert [p.action for p in plan.points] == ["drop", "drop", "keep", "drop", "keep"]
    assert plan.points[2].protected == "next differential of vdb builds on it"


def test_a_disk_left_out_of_newer_backups_keeps_its_own_newest_point() -> None:
    store = FakeStore()
    store.add(1, {"vdb": "full", "vdc": "full"})
    store.add(2, {"vdb": "incremental", "vdc": "incremental"})
    store.add(3, {"vdb": "incremental"})  # backup --disk vdb
    store.add(4, {"vdb": "incremental"})
    plan = only(plan_prune(store, "vm", None, LAST_1))  # type: ignore[arg-type]
    assert decisions(plan) == [
        ("keep", None, "next differential of vdb, vdc builds on it"),
        ("keep", None, "next incremental of vdc builds on it"),
        ("drop", None, None),
        ("keep", "last 1", "newest of chain; next incremental of vdb builds on it")]


def test_with_a_damaged_newest_point_the_newest_usable_one_stays_too() -> None:
    store = FakeStore()
    store.add(1, {"vdb": "full"})
    store.add(2, {"vdb": "incremental"})
    store.add(3, {"vdb": "incremental"})
    newest = store.add(4, {"vdb": "incremental"})
    store.broken[(newest.backup_id, "vdb")] = "vdb.qcow2 is missing"
    plan = only(plan_prune(store, "vm", None, LAST_1))  # type: ignore[arg-type]
    assert [p.action for p in plan.points] == ["keep", "drop", "keep", "keep"]
    assert plan.points[2].protected == "next incremental of vdb builds on it"


def test_a_point_another_command_serves_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    store = FakeStore()
    served = store.add(1, {"vdb": "full"})
    store.add(2, {"vdb": "full"})
    store.add(3, {"vdb": "full"})
    assert prune_plan.protected_by_running_exports(store, UUID,  # type: ignore[arg-type]
                                                   None) == {}  # type: ignore[arg-type]
    monkeypatch.setattr(prune_plan, "protected_by_running_exports",
                        lambda _store, _uuid, _chain: {served.backup_id: "served by export"})
    plan = only(plan_prune(store, "vm", None, LAST_1))  # type: ignore[arg-type]
    assert decisions(plan)[0] == ("keep", None, "served by export")
    assert decisions(plan)[1] == ("drop", None, None)


def test_an_unreadable_creation_time_falls_back_to_the_id_else_the_point_stays() -> None:
    store = FakeStore()
    by_id = store.add(1, {"vdb": "full"}, created="yesterday")
    store.add(2, {"vdb": "full"}, created="not a time")
    store.add(3, {"vdb": "full"})
    store.backups[1].backup_id = "20261399T120000Z-000002"  # no such month either
    assert prune_plan.created_at(by_id) is not None
    hostile = store.add(9, {"vdb": "full"}, created="0001-01-01T00:00:00+14:00")
    assert prune_plan.created_at(hostile) == prune_plan.created_at(
        store.add(9, {"vdb": "full"}))  # out of range in UTC: the id's time
    del store.backups[-2:]
    plan = only(plan_prune(store, "vm", None,  # type: ignore[arg-type]
                           RetentionPolicy(keep_daily=2)))
    assert decisions(plan) == [
        ("keep", "daily 2", None),
        ("keep", None, "creation time unreadable"),
        ("keep", "daily 1", "newest of chain; next incremental of vdb builds on it; "
                            "next differential of vdb builds on it")]


def test_rules_are_counted_as_if_nothing_were_protected() -> None:
    store = FakeStore()
    store.add(1, {"vdb": "full"})
    store.add(2, {"vdb": "incremental"})
    store.add(3, {"vdb": "incremental"})
    plan = only(plan_prune(store, "vm", None,  # type: ignore[arg-type]
                           RetentionPolicy(keep_last=2)))
    assert decisions(plan) == [
        ("keep", None, "next differential of vdb builds on it"),
        ("keep", "last 2", None),
        ("keep", "last 1", "newest of chain; next incremental of vdb builds on it")]


def test_every_chain_of_every_domain_or_one() -> None:
    store = FakeStore()
    store.add(1, {"vdb": "full"}, uuid=OTHER, name="b-vm")
    store.add(1, {"vdb": "full"})
    store.add(2, {"vdb": "full"}, chain="weekly")
    store.add(3, {"vdb": "full"})
    every = plan_prune(store, None, None, LAST_1)  # type: ignore[arg-type]
    assert [(p.domain_name, p.chain, len(p.points)) for p in every] == [
        ("b-vm", "default", 1), ("vm", "default", 2), ("vm", "weekly", 1)]
    weekly = plan_prune(store, None, "weekly", LAST_1)  # type: ignore[arg-type]
    assert [(p.domain_name, p.chain) for p in weekly] == [("vm", "weekly")]
    assert plan_prune(FakeStore(), None, None, LAST_1) == []  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="chain 'monthly'"):
        plan_prune(store, "vm", "monthly", LAST_1)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="chain 'monthly'"):
        plan_prune(store, None, "monthly", LAST_1)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        plan_prune(store, "nope", None, LAST_1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="malformed chain name"):
        plan_prune(store, "vm", "../x", LAST_1)  # type: ignore[arg-type]


# -- a real file repository, through the API and the command line -------------------------------

IDS = ["20261201T100000Z-000001", "20261201T110000Z-000002", "20261202T090000Z-000003",
       "20261203T090000Z-000004", "20261203T120000Z-000005"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A chain of a full and four incrementals over three days."""
    repository = Repository.open(str(tmp_path / "repo"), create=True)
    parent = None
    for backup_id in IDS:
        d, t = backup_id[:8], backup_id[9:15]
        publish(repository, backup_id, parent, b"x" * 100,
                created=f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}.000Z")
        parent = backup_id
    return tmp_path / "repo"


def test_a_dry_run_lists_each_point_and_changes_nothing(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(str(p) for p in repo.rglob("*"))
    assert main(["prune", "vm", "--target", str(repo), "--keep-daily", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"chain default of vm ({UUID}): keep 3, drop 2"
    assert [line.split()[:2] for line in out[1:]] == [
        ["keep", IDS[0]], ["drop", IDS[1]], ["keep", IDS[2]], ["drop", IDS[3]],
        ["keep", IDS[4]]]
    assert out[1].endswith("full         protected: next differential of vdb builds on it")
    assert out[3].endswith("incremental  daily 2")
    assert out[4].rstrip().endswith("incremental")
    assert out[5].endswith("daily 1, protected: newest of chain; "
                           "next incremental of vdb builds on it")
    assert sorted(str(p) for p in repo.rglob("*")) == before


def test_a_dry_run_in_json(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "prune", "--all", "--target", str(repo), "--keep-last", "1",
                 "--keep-daily", "2", "--dry-run"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [set(c) for c in document] == [{"domain_uuid", "domain_name", "chain", "points"}]
    points = document[0]["points"]
    assert points[2] == {"backup_id": IDS[2], "created": "2026-12-02T09:00:00.000Z",
                         "level": "incremental", "action": "keep", "rule": "daily 1",
                         "protected": None}
    assert [(p["action"], p["rule"]) for p in points] == [
        ("keep", None), ("keep", "daily 2"), ("keep", "daily 1"), ("drop", None),
        ("keep", "last 1")]
    plans = api.plan_prune(str(repo), RetentionPolicy(keep_last=1, keep_daily=2))
    assert [p.to_dict() for p in plans] == document

