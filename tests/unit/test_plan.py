"""The planner: which level each disk gets, from the chain's history and QEMU's bitmaps."""

from __future__ import annotations

import pytest

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.engine.plan import DataPath, Facts, overall_level, plan_backup, plan_disk
from libvirt_rdm_backup.errors import TrackingLostError, UsageError
from libvirt_rdm_backup.qemu import bitmaps as qemu_bitmaps
from libvirt_rdm_backup.repository.chain import Chain, lineage
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"
SIZE = 1 << 30


def disk(target: str = "vdb", size: int = SIZE, source: str = "/dev/loop3") -> RawDisk:
    return RawDisk(target=target, source_kind=SourceKind.BLOCK, device="disk",
                   source_path=source, size=size, node_name=f"libvirt-{target}-format")


def lun() -> RawDisk:
    return RawDisk(target="sda", source_kind=SourceKind.ISCSI, device="lun", size=SIZE,
                   iscsi=IscsiSource("127.0.0.1", 3260, "iqn.x:y", 1), node_name="libvirt-9")


def manifest(backup_id: str, level: str, parent: str | None, bitmap: str | None,
             size: int = SIZE) -> Manifest:
    record = DiskRecord(disk=disk(size=size), size=size, data_file="vdb.qcow2",
                        format="qcow2", digest=Digest("sha256", "0" * 64), level=level,
                        data_path="qemu", bytes_transferred=0, stored_bytes=0,
                        parent=parent, bitmap=bitmap)
    return Manifest(backup_id=backup_id, domain_uuid=UUID, domain_name="vm", level=level,
                    created=backup_id, completed=backup_id, consistency={},
                    domain_xml="", disks=[record], parent=parent)


FULL = manifest("20260101T000000Z-000001", "full", None, "bm-full")
INC = manifest("20260102T000000Z-000002", "incremental", FULL.backup_id, "bm-inc")
CHAIN = Chain("default", [FULL, INC])


def facts(*bitmaps: str, running: bool = True, chain: Chain = CHAIN) -> Facts:
    return Facts(running, chain, {"libvirt-vdb-format": set(bitmaps)})


def test_incremental_builds_on_the_previous_point() -> None:
    plan = plan_disk(disk(), "incremental", facts("bm-full", "bm-inc"))
    assert (plan.level, plan.path, plan.source_bitmap) == ("incremental", DataPath.QEMU, "bm-inc")
    assert plan.parent is not None and plan.parent.backup_id == INC.backup_id and plan.track


def test_differential_builds_on_the_last_full() -> None:
    plan = plan_disk(disk(), "differential", facts("bm-full", "bm-inc"))
    assert plan.level == "differential" and plan.source_bitmap == "bm-full"
    assert plan.parent is not None and plan.parent.backup_id == FULL.backup_id


@pytest.mark.parametrize(("case", "the_disk", "the_facts", "why", "auto"), [
    ("restart", disk(), facts(), "is gone", "resync"),
    ("resize", disk(size=2 * SIZE), facts("bm-inc"), "resized", "full"),
    ("replaced", disk(source="/dev/sdz"), facts("bm-inc"), "now has source", "full"),
    ("empty chain", disk(), facts("bm-inc", chain=Chain("default", [])), "no earlier backup",
     "full"),
])
def test_lost_tracking(case: str, the_disk: RawDisk, the_facts: Facts, why: str,
                       auto: str) -> None:
    with pytest.raises(TrackingLostError, match=why) as err:
        plan_disk(the_disk, "incremental", the_facts)
    assert err.value.exit_code == 4
    plan = plan_disk(the_disk, "auto", the_facts)
    assert plan.level == auto and why in plan.reason and plan.track


def rbd_disk() -> RawDisk:
    return RawDisk(target="vdc", source_kind=SourceKind.RBD, device="disk", size=SIZE,
                   rbd=RbdSource("rbd", "vm-disk", hosts=(("127.0.0.1", 6789),)),
                   node_name="libvirt-vdc-format")


def test_rbd_disks_go_through_qemu_while_running_and_storage_when_shut_off() -> None:
    plan = plan_disk(rbd_disk(), "auto", facts())
    assert (plan.path, plan.level, plan.track) == (DataPath.QEMU, "full", True)
    offline = plan_disk(rbd_disk(), "auto", facts(running=False))
    assert (offline.path, offline.level, offline.track) == (DataPath.STORAGE, "full", False)


def test_rbd_disks_with_the_rbd_agent_take_snapshots_running_or_not() -> None:
    """The rbd agent serves a running VM's RBD disk (no QEMU bitmap), a reflink agent only
    LUNs and shut-off domains; an incremental needs the previous point's snapshot alive."""
    snap = {"agent": "rbd", "disk": "vdc", "name": "rdmb-x-000002", "created": "t",
            "size": SIZE, "handle": {}}
    record = DiskRecord(disk=rbd_disk(), size=SIZE, data_file="vdc.qcow2", format="qcow2",
                        digest=Digest("sha256", "0" * 64), level="full", data_path="snapshot",
                        bytes_transferred=0, stored_bytes=0, storage_snapshot=snap)
    chain = Chain("default", [Manifest(
        backup_id="20260102T000000Z-000002", domain_uuid=UUID, domain_name="vm",
        level="full", created="t", completed="t", consistency={}, domain_xml="",
        disks=[record])])
    for running in (True, False):
        live = Facts(running, chain, {}, snapshot_agents={"vdc": "rbd"},
                     live_snapshots={"rdmb-x-000002"})
        plan = plan_disk(rbd_disk(), "auto", live)
        assert (plan.path, plan.level, plan.agent) == (DataPath.SNAPSHOT, "incremental", "rbd")
        assert plan.source_bitmap is None
    gone = plan_disk(rbd_disk(), "auto",
                     Facts(True, chain, {}, snapshot_agents={"vdc": "rbd"}))
    # no chunk map: a resync from a new snapshot, compared with the point read back
    assert gone.level == "resync" and "is gone" in gone.reason and "read back" in gone.reason
    # a target that would take no layers of ranges: QEMU's job and bitmap serve the disk
    remote = plan_disk(rbd_disk(), "auto", Facts(True, chain, {}, snapshot_agents={"vdc": "rbd"},
                                                 resync_layers=False, storage_layers=False))
    assert remote.path is DataPath.QEMU
    reflink = plan_disk(disk(), "auto", Facts(True, CHAIN, {"libvirt-vdb-format": {"bm-inc"}},
                                              snapshot_agents={"vdb": "loop-reflink"}))
    assert reflink.path is DataPath.QEMU


def _snapshot_chain(raw: RawDisk, agent: str) -> Chain:
    """A chain of one full point of ``raw`` taken from a storage snapshot it kept."""
    snap = {"agent": agent, "disk": raw.target, "name": "rdmb-x-000002", "created": "t",
            "size": SIZE, "handle": {}}
    record = DiskRecord(disk=raw, size=SIZE, data_file="img", format="raw",
                        digest=Digest("sha256", "0" * 64), level="full", data_path="snapshot",
                        bytes_transferred=0, stored_bytes=0, storage_snapshot=snap)
    return Chain("default", [Manifest(
        backup_id="20260102T000000Z-000002", domain_uuid=UUID, domain_name="vm",
        level="full", created="t", completed="t", consistency={}, domain_xml="",
        disks=[record])])


def test_targets_without_local_layers_take_ranges_of_storage_snapshots_but_no_resync() -> None:
    """An rbd:// target or an NBD volume (no local layers, but layers of ranges copied from
    storage): the RBD snapshot agent serves a running VM's RBD disk, incremental with no QEMU
    bitmap (after a VM restart); a resync is refused, and a gone snapshot means a full copy."""
    chain = _snapshot_chain(rbd_disk(), "rbd")
    live = Facts(True, chain, {}, restart="the domain was restarted",
                 snapshot_agents={"vdc": "rbd"}, live_snapshots={"rdmb-x-000002"},
                 resync_layers=False)
    plan = plan_disk(rbd_disk(), "auto", live)
    assert (plan.path, plan.level, plan.agent) == (DataPath.SNAPSHOT, "incremental", "rbd")
    assert plan.parent is not None and plan.parent.backup_id == "20260102T000000Z-000002"
    assert plan.source_bitmap is None and "storage reports as changed" in plan.reason
    assert plan_disk(rbd_disk(), "differential", live).level == "differential"
    with pytest.raises(TrackingLostError, match="chunk-compared"):
        plan_disk(rbd_disk(), "resync", live)
    gone = plan_disk(rbd_disk(), "auto", Facts(True, chain, {}, snapshot_agents={"vdc": "rbd"},
                                               resync_layers=False))
    assert (gone.path, gone.level) == (DataPath.SNAPSHOT, "full") and "is gone" in gone.reason
    # a passthrough LUN with a snapshot agent: incremental, but a full on a target that would
    # take no layers of ranges
    lun_chain = _snapshot_chain(lun(), "lvm")
    for storage_layers, level in ((True, "incremental"), (False, "full")):
        got = plan_disk(lun(), "auto", Facts(
            True, lun_chain, {}, snapshot_agents={"sda": "lvm"},
            live_snapshots={"rdmb-x-000002"}, resync_layers=False,
            storage_layers=storage_layers))
        assert (got.path, got.level) == (DataPath.SNAPSHOT, level)
    assert "cannot take layers of ranges" in got.reason


def test_offline_domains_and_luns_copy_in_full_from_storage() -> None:
    with pytest.raises(TrackingLostError, match="not running"):
        plan_disk(disk(), "incremental", facts(running=False))
    offline = plan_disk(disk(), "auto", facts(running=False))
    assert (offline.level, offline.path, offline.track) == ("resync", DataPath.STORAGE, False)
    first = plan_disk(disk(), "auto", facts(running=False, chain=Chain("default", [])))
    assert (first.level, first.path, first.track) == ("full", DataPath.STORAGE, False)
    passthrough = plan_disk(lun(), "incremental", facts("bm-inc"))
    assert (passthrough.level, passthrough.path) == ("full", DataPath.STORAGE)
    assert "bypasses" in passthrough.reason and not passthrough.track


def test_overall_level_ignores_luns_and_takes_the_costliest() -> None:
    plans = plan_backup([disk(), lun()], "incremental", facts("bm-inc"))
    assert overall_level(plans) == "incremental"
    plans = plan_backup([disk(), disk("vdc")], "auto", facts("bm-inc"))
    assert overall_level(plans) == "full"  # vdc has no earlier backup
    assert overall_level(plan_backup([lun()], "auto", facts())) == "full"


def test_unknown_level() -> None:
    with pytest.raises(UsageError):
        plan_disk(disk(), "weekly", facts())


def test_needed_bitmaps_and_lineage() -> None:
    assert CHAIN.needed_bitmaps() == {"bm-full", "bm-inc"}
    points, missing = lineage([FULL, INC], INC, "vdb")
    assert [p.backup_id for p in points] == [INC.backup_id, FULL.backup_id] and missing is None
    points, missing = lineage([INC], INC, "vdb")
    assert missing == FULL.backup_id


def with_chunks(m: Manifest) -> Manifest:
    m.disks[0].chunk_map = "vdb.chunks"
    return m


MAPPED = Chain("default", [with_chunks(manifest("20260103T000000Z-000003", "full", None,
                                                "bm-mapped"))])


def test_lost_tracking_with_a_chunk_map_resyncs() -> None:
    plan = plan_disk(disk(), "auto", facts(chain=MAPPED))
    assert plan.level == "resync" and plan.path is DataPath.QEMU and plan.track
    assert plan.parent is not None and plan.parent.backup_id == MAPPED.backups[0].backup_id
    assert "tracking was lost" in plan.reason and "differ" in plan.reason
    assert plan_disk(disk(), "auto", facts("bm-mapped", chain=MAPPED)).level == "incremental"
    explicit = plan_disk(disk(), "resync", facts("bm-mapped", chain=MAPPED))
    assert explicit.level == "resync" and explicit.source_bitmap is None
    offline = plan_disk(disk(), "auto", facts(running=False, chain=MAPPED))
    assert (offline.level, offline.path, offline.track) == ("resync", DataPath.STORAGE, False)


def test_resync_needs_an_earlier_point_and_the_same_disk() -> None:
    with pytest.raises(TrackingLostError, match="no earlier backup"):
        plan_disk(disk(), "resync", facts(chain=Chain("default", [])))
    for chain in (MAPPED, CHAIN):  # with a chunk map or without
        with pytest.raises(TrackingLostError, match="resized"):
            plan_disk(disk(size=2 * SIZE), "resync", facts(chain=chain))
        with pytest.raises(TrackingLostError, match="now has source"):
            plan_disk(disk(source="/dev/sdz"), "resync", facts(chain=chain))
    assert plan_disk(disk(size=2 * SIZE), "auto", facts(chain=MAPPED)).level == "full"
    assert overall_level(plan_backup([disk(), disk("vdc")], "auto", facts(chain=MAPPED))) == "full"


def test_a_point_naming_a_bitmap_not_made_for_it_is_not_built_on() -> None:
    """A manifest may name another chain's or a later point's bitmap: that would miss writes."""
    own = qemu_bitmaps.bitmap_name("abc123", CHAIN.name, "20260101T000100Z-bbbbbb")
    other = qemu_bitmaps.bitmap_name("abc123", "offsite", "20260101T000100Z-bbbbbb")
    for named, ok in ((own, True), (other, False), ("bm-inc", False)):
        chain = Chain(CHAIN.name, [
            manifest("20260101T000000Z-aaaaaa", "full", None, "bm-full"),
            manifest("20260101T000100Z-bbbbbb", "incremental", "20260101T000000Z-aaaaaa", named),
        ])
        live = Facts(True, chain, {"libvirt-vdb-format": {own, other, "bm-inc"}},
                     repo_id="abc123")
        plan = plan_disk(disk(), "auto", live)
        assert (plan.level == "incremental") is ok, plan.reason
        if not ok:
            assert "not the one chain" in plan.reason


def test_a_point_without_a_chunk_map_is_read_back() -> None:
    """The last point has no chunk map (an NBD volume's, an encrypted one): the resync
    compares the disk with that point read back; with a map, with the map."""
    for resync_layers in (True, False):  # a file repository or an NBD volume alike
        plan = plan_disk(disk(), "auto", Facts(True, CHAIN, {}, resync_layers=True,
                                               storage_layers=resync_layers))
        assert (plan.level, plan.path) == ("resync", DataPath.QEMU)
        assert plan.parent is not None and plan.parent.backup_id == INC.backup_id
        assert f"differ from backup {INC.backup_id} read back" in plan.reason
    explicit = plan_disk(disk(), "resync", facts("bm-full", "bm-inc"))
    assert explicit.level == "resync" and explicit.source_bitmap is None
    assert "read back" in explicit.reason
    mapped = plan_disk(disk(), "auto", facts(chain=MAPPED))
    assert mapped.level == "resync" and "read back" not in mapped.reason
    # a target that takes no resync layers (rbd://): a full, and an explicit resync fails
    rbd_target = Facts(True, CHAIN, {}, resync_layers=False)
    assert plan_disk(disk(), "auto", rbd_target).level == "full"
    with pytest.raises(TrackingLostError, match="chunk-compared") as err:
        plan_disk(disk(), "resync", rbd_target)
    assert err.value.exit_code == 4
    # QEMU on another host: no fleecing export to read, a full (a shut-off disk read from
    # storage here still resyncs)
    remote = Facts(True, CHAIN, {}, remote=True)
    assert plan_disk(disk(), "auto", remote).level == "full"
    with pytest.raises(TrackingLostError, match="another host"):
        plan_disk(disk(), "resync", remote)
    assert plan_disk(disk(), "auto", Facts(False, CHAIN, {}, remote=True)).level == "resync"
