"""A Ceph RBD disk backed up through RBD snapshots, next to a loop LUN: full, incrementals of
the extents the cluster reports as changed, still incrementals after a VM restart, a resync when
a kept snapshot is gone; the same on a shut-off domain; two RBD disks of one VM; every point
restored byte for byte."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.backup import BackupResult
from tools import cephkit, labkit
from tools.labkit import MiB, guest_write, qemu_leftovers, same_bytes

pytestmark = pytest.mark.lab

RBD_SIZE = 256 * MiB
LOOP_SIZE = 64 * MiB
CLUSTER = 64 * 1024


@pytest.fixture
def rbd_vm(ceph: None, run_token: str, rdmb_tmp: Path) -> Iterator[cephkit.RbdLoopVM]:
    # some data before the first backup
    with cephkit.rbd_and_loop_vm(f"rdmb-{run_token}-rbd-bk", rdmb_tmp, RBD_SIZE, LOOP_SIZE,
                                 8 * MiB) as vm:
        yield vm


def write(vm: cephkit.RbdLoopVM, rng: random.Random, count: int) -> int:
    """``count`` guest writes of 64 KiB to vdb and one to vdc; the bytes written to vdb."""
    for _ in range(count):
        guest_write(vm.dom, "vdb", rng.randrange(1, 250),
                    rng.randrange(0, RBD_SIZE - CLUSTER, CLUSTER), CLUSTER)
    guest_write(vm.dom, "vdc", rng.randrange(1, 250),
                rng.randrange(0, LOOP_SIZE - CLUSTER, CLUSTER), CLUSTER)
    return count * CLUSTER


def kept_snapshots(results: list[BackupResult]) -> list[str]:
    """The RBD snapshots the chain keeps: those of its last and its last full point."""
    records = [r.manifest.disk("vdb") for r in results]
    last_full = [r for r in records if r is not None and r.level == "full"][-1]
    names = {str(r.storage_snapshot["name"]) for r in (last_full, records[-1])
             if r is not None and r.storage_snapshot}
    return sorted(names)


def check_point(vm: cephkit.RbdLoopVM, result: BackupResult, level: str, written: int) -> None:
    """The RBD disk's record: read from its own RBD snapshot, at ``level``."""
    record = result.manifest.disk("vdb")
    assert record is not None and record.data_path == "snapshot", record
    assert record.disk.source_kind == "rbd"
    assert record.level == level, record.reason
    assert record.bitmap is None  # no QEMU bitmap for an RBD disk
    snap = record.storage_snapshot
    assert snap is not None and snap["agent"] == "rbd" and snap["name"].startswith("rdmb-")
    assert "key" not in json.dumps(snap)
    if level == "incremental":  # only what diff_iterate reports since the kept snapshot
        assert 0 < record.bytes_transferred <= written, (record.bytes_transferred, written)
    assert record.mapping is not None, record.mapping_error
    identity = record.mapping.root.identity
    assert identity["image"] == vm.image.name
    assert identity["point_snapshot"]["name"] == snap["name"]
    assert identity["point_snapshot"]["snap_id"] == snap["handle"]["snap_id"]


def test_rbd_disk_through_rbd_snapshots_survives_a_vm_restart(rbd_vm: cephkit.RbdLoopVM) -> None:
    """Full, incrementals from RBD snapshots (diff_iterate), a VM restart and an incremental
    still, a kept snapshot removed by hand and a resync saying why; every point restored byte
    for byte, and only the chain's last and last-full snapshots left on the image."""
    vm, rng = rbd_vm, random.Random(15)
    repo = str(vm.work / "repo")
    points: list[tuple[BackupResult, dict[str, Path]]] = []
    expected = ["full", "incremental", "incremental", "incremental", "resync"]
    for index, level in enumerate(["auto", "incremental", "auto", "auto", "auto"]):
        if index == 3:
            vm.dom.destroy()
            vm.dom.create()
        if index == 4:  # the kept snapshot of the last point is gone: the cluster cannot tell
            before = points[-1][0].manifest.disk("vdb")
            assert before is not None and before.storage_snapshot is not None
            cephkit.remove_snapshot(vm.image, str(before.storage_snapshot["name"]))
        written = write(vm, rng, 5 + index)
        refs = cephkit.references(vm, index)
        result = api.backup(vm.name, repo, level=level)
        points.append((result, refs))
        check_point(vm, result, expected[index], written)
        assert cephkit.snapshots(vm.image) == kept_snapshots([r for r, _ in points])
    resync = points[-1][0].manifest.disk("vdb")
    assert resync is not None and "is gone" in resync.reason, resync
    assert resync.stored_bytes <= 9 * CLUSTER + 4 * MiB
    for result, refs in points:
        for disk, ref in refs.items():
            out = vm.work / f"restore-{result.manifest.backup_id}-{disk}.raw"
            api.restore(vm.name, repo, disk, str(out), backup_id=result.manifest.backup_id)
            assert same_bytes(out, ref), f"{disk} of {result.manifest.backup_id} differs"
            out.unlink()
    last = points[-1][0].manifest.disk("vdb")
    assert last is not None and last.storage_snapshot is not None
    kept = cephkit.export(vm.image, vm.work / "kept.raw", last.storage_snapshot["name"])
    assert same_bytes(kept, points[-1][1]["vdb"])  # the snapshot holds the point
    assert qemu_leftovers(vm.dom) == []
    assert api.verify(repo).ok


def test_a_lone_rbd_disk_is_snapshotted_without_holding_the_guest(ceph: None, run_token: str,
                                                                   rdmb_tmp: Path) -> None:
    """The backup's only disk an RBD disk: its snapshot alone is the point (QEMU's librbd
    blocks the guest's writes while it is taken), so the guest is neither paused nor frozen.
    Full, incremental (the command with -vv: the key in no output), differential from the
    full's snapshot; each restored byte for byte; two snapshots left."""
    repo = str(rdmb_tmp / "repo")
    key = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text() \
        .split("key = ")[1].split()[0]
    with cephkit.rbd_image(64 * MiB) as image, \
            labkit.test_domain(f"rdmb-{run_token}-rbd-one",
                               [cephkit.rbd_disk("vdb", image)]) as dom:
        name, points = str(dom.name()), []
        for index, level in enumerate(["auto", "auto", "differential"]):
            guest_write(dom, "vdb", 0x31 + index, (index + 3) * MiB, 2 * CLUSTER)
            dom.suspend()  # for the reference only
            try:
                ref = cephkit.export(image, rdmb_tmp / f"ref-{index}.raw")
            finally:
                dom.resume()
            if index == 1:
                proc = labkit.rdm_backup("-vv", "backup", name, "--target", repo, "--json")
                assert proc.returncode == 0, proc.stderr
                assert key not in proc.stdout + proc.stderr
                manifest = api.list_backups(repo, name)[-1]
            else:
                manifest = api.backup(name, repo, level=level).manifest
            record = manifest.disk("vdb")
            assert record is not None and record.data_path == "snapshot"
            assert manifest.consistency == {"method": "storage-snapshot",
                                            "paused_ms": 0.0}, manifest.consistency
            points.append((manifest.backup_id, record.level, record.bytes_transferred, ref))
        assert [level for _, level, _, _ in points] == ["full", "incremental", "differential"]
        assert points[1][2] == 2 * CLUSTER and points[2][2] == 4 * CLUSTER, points
        assert len(cephkit.snapshots(image)) == 2  # the full's and the differential's
        for backup_id, _level, _copied, ref in points:
            out = rdmb_tmp / f"restore-{backup_id}.raw"
            api.restore(name, repo, "vdb", str(out), backup_id=backup_id)
            assert same_bytes(out, ref), f"point {backup_id} differs"


def test_rbd_disk_of_a_shut_off_domain_is_read_from_the_cluster(ceph: None, run_token: str,
                                                                 rdmb_tmp: Path) -> None:
    """Full, then incremental, read from RBD snapshots by a storage daemon or qemu-nbd;
    the cephx key in no output, -vv log or repository file."""
    repo = str(rdmb_tmp / "repo")
    keyring = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text()
    key = keyring.split("key = ")[1].split()[0]
    with cephkit.rbd_image(64 * MiB) as image, \
            labkit.test_domain(f"rdmb-{run_token}-rbd-off", [cephkit.rbd_disk("vdb", image)],
                               start=False) as dom:
        name = str(dom.name())
        levels = []
        for index in range(2):
            cephkit.write_pattern(image, index * 20 * MiB, MiB, 0x21 + index)
            ref = cephkit.export(image, rdmb_tmp / f"ref-{index}.raw")
            proc = labkit.rdm_backup("-vv", "backup", name, "--target", repo, "--json")
            assert proc.returncode == 0, proc.stderr
            assert key not in proc.stdout + proc.stderr  # not in -vv logs, QMP traffic included
            [disk] = json.loads(proc.stdout)["disks"]
            assert disk["data_path"] == "snapshot", disk
            levels.append(disk["level"])
            out = rdmb_tmp / f"restore-{index}.raw"
            api.restore(name, repo, "vdb", str(out))
            assert same_bytes(out, ref), f"point {index} differs"
        assert levels == ["full", "incremental"], levels
        assert json.loads(proc.stdout)["disks"][0]["bytes_transferred"] == MiB
        assert len(cephkit.snapshots(image)) == 2  # the last and the last full point's
    stored = [p for p in Path(repo).rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if key.encode() in p.read_bytes()]


def test_two_rbd_disks_share_one_point_and_keep_two_snapshots_each(
        ceph: None, run_token: str, rdmb_tmp: Path) -> None:
    """A VM with two RBD disks in one pool: each snapshotted inside one window (the guest
    held: per-image snapshots are not atomic across images, and Ceph 16 reads no group
    snapshot), full then incrementals of only the rewritten extents, each point of each disk
    restored byte for byte; the superseded snapshots removed after each publish, and one a
    killed removal would leave (the chain's name, no manifest) removed by the next run."""
    repo = str(rdmb_tmp / "repo")
    with cephkit.rbd_image(64 * MiB) as first, cephkit.rbd_image(64 * MiB) as second, \
            labkit.test_domain(f"rdmb-{run_token}-rbd-two",
                               [cephkit.rbd_disk("vdb", first),
                                cephkit.rbd_disk("vdc", second)]) as dom:
        name, images = str(dom.name()), {"vdb": first, "vdc": second}
        leftover = None
        for index in range(3):
            for offset, disk in enumerate(images):
                guest_write(dom, disk, 0x41 + index + offset, (index * 7 + offset) * MiB, CLUSTER)
            dom.suspend()  # for the references only
            try:
                refs = {disk: cephkit.export(image, rdmb_tmp / f"ref-{index}-{disk}.raw")
                        for disk, image in images.items()}
            finally:
                dom.resume()
            if index == 2:  # what a removal cut short by a kill leaves behind
                leftover = cephkit.snapshots(first)[0][:-6] + "abcdef"
                cephkit.create_snapshot(first, leftover)
            manifest = api.backup(name, repo).manifest
            assert manifest.consistency["method"] != "storage-snapshot", manifest.consistency
            for disk, image in images.items():
                record = manifest.disk(disk)
                assert record is not None and record.data_path == "snapshot", record
                assert record.level == ("full" if index == 0 else "incremental"), record.reason
                if index:
                    assert record.bytes_transferred == CLUSTER, record.bytes_transferred
                snaps = cephkit.snapshots(image)  # after this process's removals
                assert record.storage_snapshot is not None
                assert record.storage_snapshot["name"] in snaps
                assert len(snaps) == min(index + 1, 2), snaps  # last and last full
                out = rdmb_tmp / f"restore-{index}-{disk}.raw"
                api.restore(name, repo, disk, str(out), backup_id=manifest.backup_id)
                assert same_bytes(out, refs[disk]), f"point {index} of {disk} differs"
        assert leftover is not None and leftover not in cephkit.snapshots(first)
