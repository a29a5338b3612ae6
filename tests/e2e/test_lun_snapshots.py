"""SCSI passthrough LUNs backed up through storage snapshots: short holds, ranged incrementals."""

from __future__ import annotations

import os
import random
from contextlib import ExitStack
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.engine.backup import BackupResult
from tests.lab.volume_server import VolumeServer
from tools.labkit import (
    LabVM,
    MiB,
    dirty_bitmaps,
    guest_write,
    lab_vm,
    qemu_leftovers,
    same_bytes,
    snapshot_source,
)

pytestmark = pytest.mark.lab

CLUSTER = 64 * 1024
LUN_SIZE = 256 * MiB


def scattered(vm: LabVM, disk: str, size: int, count: int, seed: int) -> int:
    rng = random.Random(seed)
    for index, slot in enumerate(rng.sample(range(size // CLUSTER), count)):
        guest_write(vm.dom, disk, 1 + (seed + index) % 250, slot * CLUSTER, CLUSTER)
    return count * CLUSTER


def point(vm: LabVM, repo: str, tag: str, **kwargs: object) -> tuple[BackupResult, dict[str, Path]]:
    """Reference copies at the point, then a backup during which the guest keeps writing."""
    vm.dom.suspend()
    try:
        refs = snapshot_source(vm, vm.workdir / f"ref-{tag}")
    finally:
        vm.dom.resume()
    seen: list[int] = []

    def write_after_point(_job: str, _done: int, _total: int) -> None:
        if not seen:
            seen.append(1)
            scattered(vm, "sda", LUN_SIZE, 4, seed=len(tag) + 99)

    result = api.backup(vm.name, repo, progress=write_after_point, **kwargs)  # type: ignore[arg-type]
    return result, refs


def restore_all(vm: LabVM, repo: str, result: BackupResult, refs: dict[str, Path]) -> None:
    for disk, ref in refs.items():
        out = vm.workdir / f"restored-{result.manifest.backup_id}-{disk}.raw"
        api.restore(vm.name, repo, disk, str(out), backup_id=result.manifest.backup_id)
        assert same_bytes(out, ref), f"{disk} differs from its point in time"
        out.unlink()


def snapshot_files(vm: LabVM) -> list[str]:
    directory = vm.iscsi_file.parent / ".rdmb-snapshots"
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_lun_full_and_incremental_from_storage_snapshots() -> None:
    with lab_vm(loop_size=128 * MiB, lun_size=LUN_SIZE, reflink=True) as vm:
        repo = str(vm.workdir / "repo")
        scattered(vm, "sda", LUN_SIZE, 200, seed=1)
        scattered(vm, "vdb", 128 * MiB, 50, seed=2)
        full, refs = point(vm, repo, "full")
        sda = full.manifest.disk("sda")
        assert sda is not None and sda.data_path == "snapshot" and sda.level == "full"
        assert sda.storage_snapshot and sda.storage_snapshot["agent"] == "tgt-reflink"
        assert full.manifest.disk("vdb").data_path == "qemu"  # type: ignore[union-attr]
        consistency = full.manifest.consistency
        assert consistency["method"] == "pause"
        # the guest is held only while the snapshot is taken and the jobs start (how
        # briefly is measured by `make bench`, section lun, not asserted here)
        assert consistency["paused_ms"] > 0, consistency
        restore_all(vm, repo, full, refs)

        changed = scattered(vm, "sda", LUN_SIZE, 26, seed=3)  # 1% of the LUN
        inc, refs = point(vm, repo, "inc")
        sda = inc.manifest.disk("sda")
        assert sda is not None and sda.level == "incremental" and sda.data_path == "snapshot"
        assert sda.parent == full.manifest.backup_id
        # only the ranges the storage reports as changed are stored: the 26 clusters
        # plus the 4 written during the previous backup, after its point
        assert 0 < sda.bytes_transferred <= changed + 4 * CLUSTER
        assert sda.stored_bytes < 4 * MiB
        restore_all(vm, repo, inc, refs)
        restore_all(vm, repo, full, {"sda": vm.workdir / "ref-full" / "sda.raw"})

        # snapshots kept: the last full's and the newest (for differentials/incrementals)
        assert len(snapshot_files(vm)) == 2
        third, refs = point(vm, repo, "third")
        assert third.manifest.disk("sda").level == "incremental"  # type: ignore[union-attr]
        assert len(snapshot_files(vm)) == 2
        restore_all(vm, repo, third, refs)
        assert qemu_leftovers(vm.dom) == []
        assert not [b for b in dirty_bitmaps(vm.dom) if "sda" in b]
        assert api.verify(repo).ok


@pytest.mark.fault
@pytest.mark.parametrize("target", ["file", "volume"])
def test_lost_snapshot_falls_back_to_a_resync(target: str) -> None:
    """In an NBD volume (no chunk maps) the new snapshot is compared with the last point read
    back from the volume."""
    with lab_vm(loop_size=64 * MiB, lun_size=LUN_SIZE, reflink=True) as vm, ExitStack() as stack:
        repo = str(vm.workdir / "repo")
        if target == "volume":
            server = VolumeServer(vm.workdir / "volume.img")
            server.start()
            stack.callback(server.stop)
            repo = server.uri
        scattered(vm, "sda", LUN_SIZE, 100, seed=5)
        point(vm, repo, "a", disks=["sda"])
        for name in snapshot_files(vm):  # someone deleted the array's snapshot
            os.unlink(vm.iscsi_file.parent / ".rdmb-snapshots" / name)
        changed = scattered(vm, "sda", LUN_SIZE, 10, seed=6)
        result, refs = point(vm, repo, "b", disks=["sda"])
        sda = result.manifest.disk("sda")
        assert sda is not None and sda.level == "resync" and "is gone" in sda.reason
        assert ("read back" in sda.reason) == (target == "volume"), sda.reason
        assert sda.bytes_transferred <= changed + 4 * CLUSTER
        restore_all(vm, repo, result, {"sda": refs["sda"]})


def test_scsi_hostdev_is_backed_up_like_a_lun(tmp_path: Path) -> None:
    import subprocess

    from tools.labkit import (
        iscsi_hostdev,
        iscsi_target,
        rdmb_reflink_tmpdir,
        test_domain,
        unique_name,
    )

    with ExitStack() as stack:
        work = stack.enter_context(rdmb_reflink_tmpdir())
        backing = work / "hostdev.img"
        with open(backing, "wb") as stream:
            stream.truncate(64 * MiB)
        lun = stack.enter_context(iscsi_target(backing))
        dom = stack.enter_context(test_domain(unique_name("rdmb-hostdev"),
                                              [iscsi_hostdev(lun.iqn, lun.lun)]))
        inventory = api.discover(dom.name())
        assert [(d.target, str(d.source_kind)) for d in inventory.raw] == [
            ("hostdev0", "scsi-hostdev")]
        mapping = api.map_disks(dom.name())[0].to_dict()
        assert mapping["storage"]["identity"]["iqn"] == lun.iqn
        assert mapping["storage"]["extents"][0]["target"]["path"] == str(backing)

        def storage_write(pattern: int, offset: int) -> None:
            subprocess.run(["qemu-io", "-f", "raw", lun.url, "-c",
                            f"write -P {pattern} {offset} 1M"], check=True, capture_output=True)

        repo = str(work / "repo")
        storage_write(0x11, 0)
        full = api.backup(dom.name(), repo)
        record = full.manifest.disk("hostdev0")
        assert record is not None and record.data_path == "snapshot"
        assert full.manifest.consistency["paused_ms"] > 0
        reference = work / "ref.raw"
        subprocess.run(["cp", "--sparse=always", str(backing), str(reference)], check=True)
        storage_write(0x22, 32 * MiB)
        inc = api.backup(dom.name(), repo)
        record = inc.manifest.disk("hostdev0")
        assert record is not None and record.level == "incremental"
        assert record.bytes_transferred == MiB
        for backup_id, expected in ((full.manifest.backup_id, reference),
                                    (inc.manifest.backup_id, backing)):
            out = work / f"{backup_id}.raw"
            api.restore(dom.name(), repo, "hostdev0", str(out), backup_id=backup_id,
                        force=True)
            assert same_bytes(out, expected)


def test_shut_off_disk_on_snapshot_storage_gets_ranged_incrementals() -> None:
    with lab_vm(loop_size=128 * MiB, lun_size=16 * MiB, reflink=True, start=False) as vm:
        repo = str(vm.workdir / "repo")

        def host_write(pattern: int, offset: int, length: int) -> None:
            with open(vm.loop, "r+b") as stream:
                stream.seek(offset)
                stream.write(bytes([pattern]) * length)
                stream.flush()
                os.fsync(stream.fileno())

        host_write(0x31, 0, 4 * MiB)
        first = api.backup(vm.name, repo, disks=["vdb"])
        vdb = first.manifest.disk("vdb")
        assert vdb is not None and vdb.data_path == "snapshot" and vdb.level == "full"
        assert vdb.storage_snapshot and vdb.storage_snapshot["agent"] == "loop-reflink"
        host_write(0x32, 64 * MiB, 2 * MiB)
        refs = snapshot_source(vm, vm.workdir / "ref")
        second = api.backup(vm.name, repo, disks=["vdb"])
        vdb = second.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "incremental"
        assert vdb.bytes_transferred == 2 * MiB
        out = vm.workdir / "vdb.raw"
        api.restore(vm.name, repo, "vdb", str(out))
        assert same_bytes(out, refs["vdb"])


@pytest.mark.fault
def test_snapshots_left_by_a_killed_run_are_pruned() -> None:
    import subprocess

    from libvirt_rdm_backup.repository.store import Repository
    from libvirt_rdm_backup.storage.snapshot_agents import agent_by_name
    from libvirt_rdm_backup.storage.snapshots import scoped_prefix

    with lab_vm(loop_size=64 * MiB, lun_size=LUN_SIZE, reflink=True) as vm:
        repo = str(vm.workdir / "repo")
        scattered(vm, "sda", LUN_SIZE, 20, seed=8)
        first, _ = point(vm, repo, "p1", disks=["sda"])
        kept = first.manifest.disk("sda").storage_snapshot["name"]  # type: ignore[index,union-attr]
        # what a run killed between snapshot and publish leaves: a clone and its target
        disk = api.discover(vm.name).find("sda")
        assert isinstance(disk, RawDisk)
        agent = agent_by_name("tgt-reflink")
        prefix = scoped_prefix(Repository.open(repo).repo_id, "default", "sda")
        orphan = agent.snapshot(disk, prefix + "dead01")
        agent.present(disk, orphan)
        other_chain = agent.snapshot(disk, scoped_prefix("abcdef", "other", "sda") + "keep01")
        try:
            assert orphan.name + ".img" in snapshot_files(vm)
            second, refs = point(vm, repo, "p2", disks=["sda"])
            names = snapshot_files(vm)
            assert orphan.name + ".img" not in names  # pruned
            assert other_chain.name + ".img" in names  # another chain's: untouched
            assert kept + ".img" in names  # the last full of this chain: kept
            targets = subprocess.run(["tgtadm", "--lld", "iscsi", "--op", "show", "--mode",
                                      "target"], capture_output=True, text=True).stdout
            assert orphan.name not in targets
            assert second.manifest.disk("sda").level == "incremental"  # type: ignore[union-attr]
            restore_all(vm, repo, second, {"sda": refs["sda"]})
        finally:
            agent.delete(disk, other_chain)
            agent.delete(disk, orphan)
