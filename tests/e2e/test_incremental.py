"""Incremental and differential chains of raw disks on the real lab, restored point by point."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.backup import BackupResult
from libvirt_rdm_backup.errors import OperationError
from tests.oracles import unfinished_under
from tools.labkit import (
    LabVM,
    MiB,
    dirty_bitmaps,
    guest_write,
    lab_vm,
    qemu_leftovers,
    qmp,
    rdm_backup,
    same_bytes,
    snapshot_source,
)

pytestmark = pytest.mark.lab

CLUSTER = 64 * 1024
LOOP_SIZE = 256 * MiB
LUN_SIZE = 64 * MiB


class Writer:
    """Guest writes of distinct patterns at random cluster-aligned offsets."""

    def __init__(self, vm: LabVM, seed: int) -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.pattern = 0

    def write(self, disk: str, count: int, size: int = LOOP_SIZE) -> int:
        """``count`` writes of 64 KiB (some of 128 KiB); returns the bytes written."""
        total = 0
        for _ in range(count):
            length = CLUSTER * self.rng.choice((1, 1, 2))
            offset = self.rng.randrange(0, size - length, CLUSTER)
            self.pattern = self.pattern % 250 + 1
            guest_write(self.vm.dom, disk, self.pattern, offset, length)
            total += length
        return total


def backup_point(vm: LabVM, repo: str, work: Path, writer: Writer, index: int,
                 **kwargs: object) -> tuple[BackupResult, dict[str, Path]]:
    """Fix a reference of the sources, then back up while the guest keeps writing."""
    vm.dom.suspend()
    try:
        refs = snapshot_source(vm, work / f"ref-{index}")
    finally:
        vm.dom.resume()
    during: list[int] = []

    def write_during(_job: str, _done: int, _total: int) -> None:
        if not during:  # called only once the point in time is fixed
            during.append(writer.write("vdb", 6))

    result = api.backup(vm.name, repo, progress=write_during, **kwargs)  # type: ignore[arg-type]
    return result, refs


def restore_and_compare(vm: LabVM, repo: str, work: Path, backup_id: str,
                        refs: dict[str, Path]) -> None:
    for disk, ref in refs.items():
        out = work / f"restore-{backup_id}-{disk}.raw"
        api.restore(vm.name, repo, disk, str(out), backup_id=backup_id)
        assert same_bytes(out, ref), f"{disk} of {backup_id} differs from its point in time"
        out.unlink()


@pytest.fixture
def small_vm() -> LabVM:  # type: ignore[misc]
    with lab_vm(loop_size=LOOP_SIZE, lun_size=LUN_SIZE) as vm:
        yield vm


def test_chain_of_incrementals_and_differentials_restores_every_point(small_vm: LabVM) -> None:
    vm, work = small_vm, small_vm.workdir
    repo = str(work / "repo")
    writer = Writer(vm, seed=11)
    writer.write("vdb", 40)
    writer.write("sda", 10, LUN_SIZE)
    points = []
    levels = ["auto", "incremental", "incremental", "differential", "auto", "incremental"]
    for index, level in enumerate(levels):
        result, refs = backup_point(vm, repo, work, writer, index, level=level)
        points.append((result, refs))
        written = writer.write("vdb", 12) + writer.write("sda", 3, LUN_SIZE)
        assert written > 0

    results = [r for r, _ in points]
    assert [r.manifest.level for r in results] == [
        "full", "incremental", "incremental", "differential", "incremental", "incremental"]
    full, first_inc = results[0].manifest, results[1].manifest
    assert "no earlier backup" in full.disk("vdb").reason  # type: ignore[union-attr]
    assert first_inc.disk("vdb").parent == full.backup_id  # type: ignore[union-attr]
    diff = results[3].manifest.disk("vdb")
    assert diff is not None and diff.parent == full.backup_id
    after_diff = results[4].manifest.disk("vdb")
    assert after_diff is not None and after_diff.parent == results[3].manifest.backup_id
    for result in results:
        lun = result.manifest.disk("sda")
        assert lun is not None and lun.level == "full" and "passthrough" in lun.reason
    # an incremental holds only what changed: 12-24 clusters between points, plus 6-12 during
    for result in results[1:3]:
        inc = result.manifest.disk("vdb")
        assert inc is not None and 0 < inc.bytes_transferred <= 40 * CLUSTER
        assert inc.stored_bytes < 4 * MiB

    for result, refs in points:
        restore_and_compare(vm, repo, work, result.manifest.backup_id, refs)

    # the chain keeps only the bitmaps still useful: since the last backup and the last full
    ours = {b for b in dirty_bitmaps(vm.dom) if b.startswith("rdmb-")}
    assert ours == {results[-1].manifest.disk("vdb").bitmap,  # type: ignore[union-attr]
                    full.disk("vdb").bitmap}  # type: ignore[union-attr]
    assert qemu_leftovers(vm.dom) == []
    assert api.verify(repo).ok


def test_independent_chains(small_vm: LabVM) -> None:
    vm, work = small_vm, small_vm.workdir
    repo_a, repo_b = str(work / "local"), str(work / "offsite")
    writer = Writer(vm, seed=5)
    writer.write("vdb", 10)
    a0, _ = backup_point(vm, repo_a, work, writer, 0, chain="local")
    writer.write("vdb", 10)
    b0, _ = backup_point(vm, repo_b, work, writer, 1, chain="offsite")
    writer.write("vdb", 10)
    a1, refs_a1 = backup_point(vm, repo_a, work, writer, 2, chain="local", level="incremental")
    writer.write("vdb", 10)
    b1, refs_b1 = backup_point(vm, repo_b, work, writer, 3, chain="offsite",
                               level="incremental")
    a2, refs_a2 = backup_point(vm, repo_a, work, writer, 4, chain="weekly", disks=["vdb"])
    assert a2.manifest.level == "full"  # a new chain starts with a full copy
    assert a1.manifest.disk("vdb").parent == a0.manifest.backup_id  # type: ignore[union-attr]
    assert b1.manifest.disk("vdb").parent == b0.manifest.backup_id  # type: ignore[union-attr]
    restore_and_compare(vm, repo_a, work, a1.manifest.backup_id, refs_a1)
    restore_and_compare(vm, repo_b, work, b1.manifest.backup_id, refs_b1)
    restore_and_compare(vm, repo_a, work, a2.manifest.backup_id, {"vdb": refs_a2["vdb"]})


@pytest.mark.fault
def test_restart_loses_tracking_and_auto_resyncs(small_vm: LabVM) -> None:
    vm, work = small_vm, small_vm.workdir
    repo = str(work / "repo")
    writer = Writer(vm, seed=7)
    writer.write("vdb", 60)
    first, _ = backup_point(vm, repo, work, writer, 0)
    vm.dom.destroy()
    vm.dom.create()
    changed = writer.write("vdb", 10)
    proc = rdm_backup("backup", vm.name, "--target", repo, "--level", "incremental")
    assert proc.returncode == 4
    assert "no incremental backup of vdb is possible" in proc.stderr
    assert "tracking was lost" in proc.stderr and proc.stderr.count("\n") == 1
    assert api.list_backups(repo)[-1].backup_id == first.manifest.backup_id

    result, refs = backup_point(vm, repo, work, writer, 1)
    vdb = result.manifest.disk("vdb")
    assert vdb is not None and vdb.level == "resync" and "tracking was lost" in vdb.reason
    assert result.manifest.level == "resync"
    assert vdb.parent == first.manifest.backup_id
    # only what changed since the last backup is stored (the 6 writes made during the
    # previous backup's copy among it), not the disk and not its earlier data
    during_first = 6 * 2 * CLUSTER
    assert 0 < vdb.bytes_transferred <= changed + during_first
    restore_and_compare(vm, repo, work, result.manifest.backup_id, refs)
    # and tracking starts again from there
    writer.write("vdb", 5)
    again, refs = backup_point(vm, repo, work, writer, 2, level="incremental")
    assert again.manifest.level == "incremental"
    assert again.manifest.disk("vdb").parent == result.manifest.backup_id  # type: ignore[union-attr]
    restore_and_compare(vm, repo, work, again.manifest.backup_id, refs)
    assert qemu_leftovers(vm.dom) == []


@pytest.mark.fault
def test_resync_of_a_shut_off_domain_and_explicit_resync() -> None:
    with lab_vm(loop_size=LOOP_SIZE, lun_size=LUN_SIZE) as vm:
        work, repo = vm.workdir, str(vm.workdir / "repo")
        writer = Writer(vm, seed=9)
        writer.write("vdb", 30)
        backup_point(vm, repo, work, writer, 0)
        changed = writer.write("vdb", 8)
        vm.dom.shutdown()
        vm.dom.destroy()
        refs = snapshot_source(vm, work / "ref-off")
        offline = api.backup(vm.name, repo)
        vdb = offline.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "resync" and vdb.data_path == "storage"
        assert vdb.bytes_transferred <= changed + 6 * 2 * CLUSTER
        assert offline.manifest.disk("sda").level == "full"  # type: ignore[union-attr]
        restore_and_compare(vm, repo, work, offline.manifest.backup_id, refs)

        vm.dom.create()
        writer.write("vdb", 4)
        explicit, refs = backup_point(vm, repo, work, writer, 1, level="resync")
        assert explicit.manifest.disk("vdb").level == "resync"  # type: ignore[union-attr]
        restore_and_compare(vm, repo, work, explicit.manifest.backup_id, refs)
        assert api.verify(repo).ok


def _start_backup(vm: LabVM, repo: str, level: str) -> subprocess.Popen[str]:
    exe = Path(sys.executable).parent / "rdm-backup"
    return subprocess.Popen([str(exe), "backup", vm.name, "--target", repo, "--disk", "vdb",
                             "--level", level, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when_copying(proc: subprocess.Popen[str], vm: LabVM) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(item.startswith("job ") for item in qemu_leftovers(vm.dom)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"backup ended before it could be killed: {proc.communicate()}")
        time.sleep(0.005)
    pytest.fail("the backup job never started")


@pytest.mark.fault
def test_killed_backups_lose_no_tracking() -> None:
    with lab_vm(loop_size=1024 * MiB, lun_size=LUN_SIZE) as vm:
        work, repo = vm.workdir, str(vm.workdir / "repo")
        # enough data that copying takes a while: 400 MiB in scattered 4 MiB pieces
        for index in range(100):
            guest_write(vm.dom, "vdb", 0x40 + index % 100, index * 10 * MiB, 4 * MiB)
        writer = Writer(vm, seed=3)
        first, refs0 = backup_point(vm, repo, work, writer, 0, disks=["vdb"])

        writer.write("vdb", 20, 1024 * MiB)
        # a full backup killed mid-copy, then an incremental killed mid-copy
        for level in ("full", "incremental"):
            proc = _start_backup(vm, repo, level)
            _kill_when_copying(proc, vm)
            assert proc.returncode == -signal.SIGKILL
            writer.write("vdb", 10, 1024 * MiB)
        assert [m.backup_id for m in api.list_backups(repo)] == [first.manifest.backup_id]

        vm.dom.suspend()
        try:
            refs = snapshot_source(vm, work / "ref-after-kills")
        finally:
            vm.dom.resume()
        result = api.backup(vm.name, repo, disks=["vdb"], level="incremental")
        vdb = result.manifest.disk("vdb")
        assert vdb is not None and vdb.parent == first.manifest.backup_id
        assert qemu_leftovers(vm.dom) == []
        ours = {b for b in dirty_bitmaps(vm.dom) if b.startswith("rdmb-")}
        assert ours == {first.manifest.disk("vdb").bitmap, vdb.bitmap}  # type: ignore[union-attr]
        assert unfinished_under(repo) == []
        restore_and_compare(vm, repo, work, result.manifest.backup_id, {"vdb": refs["vdb"]})
        restore_and_compare(vm, repo, work, first.manifest.backup_id, {"vdb": refs0["vdb"]})
        listed = json.loads(rdm_backup("list", "--target", repo, "--json").stdout)
        assert [b["level"] for b in listed] == ["full", "incremental"]


@pytest.mark.fault
def test_cancelled_job_and_resized_disk(small_vm: LabVM) -> None:
    vm, work = small_vm, small_vm.workdir
    repo = str(work / "repo")
    writer = Writer(vm, seed=13)
    writer.write("vdb", 20)
    first, _ = backup_point(vm, repo, work, writer, 0, disks=["vdb"])
    writer.write("vdb", 10)
    guest_write(vm.dom, "vdb", 0x77, 64 * MiB, 192 * MiB)  # enough to copy for a while

    # someone cancels our QEMU job: the backup fails, publishes nothing, keeps tracking
    cancelled: list[str] = []

    def cancel(job: str, _done: int, _total: int) -> None:
        if not cancelled:
            qmp(vm.dom, "block-job-set-speed", {"device": job, "speed": 1})
            qmp(vm.dom, "job-cancel", {"id": job})
            cancelled.append(job)

    with pytest.raises(OperationError, match="job"):
        # held at 32 MiB/s, so that the job is surely still copying when it is cancelled
        api.backup(vm.name, repo, disks=["vdb"], level="incremental", progress=cancel,
                   bwlimit=32)
    assert cancelled
    assert [m.backup_id for m in api.list_backups(repo)] == [first.manifest.backup_id]
    result, refs = backup_point(vm, repo, work, writer, 1, disks=["vdb"], level="incremental")
    vdb = result.manifest.disk("vdb")
    assert vdb is not None and vdb.parent == first.manifest.backup_id
    assert vdb.bytes_transferred >= 128 * MiB  # the cancelled copy is not lost
    restore_and_compare(vm, repo, work, result.manifest.backup_id, {"vdb": refs["vdb"]})


@pytest.mark.fault
def test_resized_disk_gets_a_full_copy() -> None:
    with lab_vm(loop_size=LOOP_SIZE, lun_size=LUN_SIZE, sizelimit=False) as vm:
        work, repo = vm.workdir, str(vm.workdir / "repo")
        writer = Writer(vm, seed=17)
        writer.write("vdb", 20)
        backup_point(vm, repo, work, writer, 0, disks=["vdb"])
        # the LUN grows: neither an incremental nor a resync can stand for it
        with open(vm.loop_file, "r+b") as stream:
            stream.truncate(os.path.getsize(vm.loop_file) + 64 * MiB)
        subprocess.run(["losetup", "-c", vm.loop], check=True)
        subprocess.run(["virsh", "blockresize", vm.name, "vdb", f"{LOOP_SIZE + 64 * MiB}B"],
                       check=True, capture_output=True)
        proc = rdm_backup("backup", vm.name, "--target", repo, "--disk", "vdb", "--level",
                          "incremental")
        assert proc.returncode == 4 and "resized" in proc.stderr
        proc = rdm_backup("backup", vm.name, "--target", repo, "--disk", "vdb", "--level",
                          "resync")
        assert proc.returncode == 4 and "resized" in proc.stderr
        grown, refs = backup_point(vm, repo, work, writer, 2, disks=["vdb"])
        vdb = grown.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "full" and "resized" in vdb.reason
        assert vdb.size == LOOP_SIZE + 64 * MiB
        restore_and_compare(vm, repo, work, grown.manifest.backup_id, {"vdb": refs["vdb"]})
