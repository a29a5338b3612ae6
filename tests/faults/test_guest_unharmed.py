"""The backup target fails while the guest keeps writing: the guest never notices.

A full repository, and an NBD server that stops answering, each during a running
backup job. Every simulated guest write is judged by its result in the domain's
QEMU log (the HMP reply is always empty); the guest must stay running (state and
reason), the backup must fail with exit 4, and the next backup must hold every
write (restores compared byte for byte).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from tests.faults.points import Points
from tests.faults.test_full_filesystem import leave_free, small_filesystem
from tests.lab.domains import assert_running
from tests.lab.volume_server import SERVING, VolumeServer
from tools.labkit import (
    LabVM,
    MiB,
    alias_of,
    dirty_bitmaps,
    guest_write,
    lab_vm,
    qemu_leftovers,
    qmp,
    try_guest_write,
)

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"
LOOP = 128 * MiB
SLOW = 2 * MiB  # bytes/s QEMU may read from vdb's LUN during the backup
WRITE_WAIT = 60.0  # seconds a guest write may take before it counts as hung


def slow_reads(vm: LabVM, limit: int = SLOW) -> None:
    """Throttle QEMU's reads of vdb's LUN (the domain's blkio cgroup): a backup copies
    for seconds, so the guest writes while it runs; the guest's own writes stay fast.
    ``limit`` 0 lifts the throttle (the backups after the fault need not crawl)."""
    pid = Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text(encoding="ascii").strip()
    for line in Path(f"/proc/{pid}/cgroup").read_text(encoding="ascii").splitlines():
        _id, controllers, path = line.split(":", 2)
        if "blkio" in controllers.split(","):
            rdev = os.stat(vm.loop).st_rdev
            throttle = Path("/sys/fs/cgroup/blkio", path.lstrip("/"),
                            "blkio.throttle.read_bps_device")
            throttle.write_text(f"{os.major(rdev)}:{os.minor(rdev)} {limit}\n",
                                encoding="ascii")
            rule = f"{os.major(rdev)}:{os.minor(rdev)} "
            assert (rule in throttle.read_text(encoding="ascii")) == (limit > 0), limit
            return
    pytest.skip("no blkio cgroup for the domain's QEMU")


def start_backup(vm: LabVM, target: str, level: str, **env: str) -> subprocess.Popen[str]:
    """The CLI backing up vdb; returns once the point is fixed and being read."""
    proc = subprocess.Popen([str(EXE), "backup", vm.name, "--target", target, "--disk", "vdb",
                             "--level", level], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while not any(item.startswith(("node rdmb-access-", "job rdmb-"))
                  for item in qemu_leftovers(vm.dom)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the backup never read its point"
        time.sleep(0.005)
    return proc


def write_meanwhile(vm: LabVM, end: int, count: int, first_pattern: int) -> list[str | None]:
    """``count`` guest writes of 1 MiB below ``end`` of vdb, downwards; their results.

    Below ``end`` lies data the backup has to copy and copies last: each write
    makes QEMU copy the old data before it lands.

    Each write runs in a thread: one still hanging after WRITE_WAIT counts as failed
    (the guest would be stuck on its target's trouble).
    """
    results: list[str | None] = []
    for index in range(count):
        got: list[str | None] = []
        offset = end - (index + 1) * MiB
        worker = threading.Thread(target=_write_into, daemon=True,
                                  args=(vm, first_pattern + index, offset, got))
        worker.start()
        worker.join(WRITE_WAIT)
        results.append(got[0] if got else f"write at {offset} still hanging")
        if not got:
            break
    return results


def _write_into(vm: LabVM, pattern: int, offset: int, got: list[str | None]) -> None:
    got.append(try_guest_write(vm.dom, "vdb", pattern, offset, MiB))


@pytest.mark.parametrize("level", ["incremental", "resync"])
def test_full_repository_fails_the_backup_not_the_guest(level: str) -> None:
    with lab_vm(loop_size=LOOP, lun_size=16 * MiB) as vm:
        with small_filesystem(vm.workdir / "repo-fs.img", vm.workdir / "mnt", 384 * MiB):
            repo = str(vm.workdir / "mnt" / "repo")
            points = Points(vm, repo, disks=["vdb"])
            guest_write(vm.dom, "vdb", 0x41, 0, 4 * MiB)
            points.backup()
            tracked = dirty_bitmaps(vm.dom)
            for index in range(6):
                guest_write(vm.dom, "vdb", 0x50 + index, index * 8 * MiB, 8 * MiB)
            ballast = leave_free(vm.workdir / "mnt", 6 * MiB)
            slow_reads(vm)
            proc = start_backup(vm, repo, level)
            results = write_meanwhile(vm, 48 * MiB, 12, 0x60)
            _out, err = proc.communicate(timeout=300)
            assert [r for r in results if r is not None] == [], results
            assert_running(vm.dom)
            assert proc.returncode == 4, err
            assert err.count("\n") == 1 and "no space left" in err.lower(), err
            assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
            assert qemu_leftovers(vm.dom) == [] and dirty_bitmaps(vm.dom) == tracked
            slow_reads(vm, 0)
            # room again: the next incremental holds the writes made before and during it
            ballast.unlink()
            again = points.backup(level="incremental")
            assert again.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
            assert points.restore_every_point() == 2


def serving_pid(server: VolumeServer) -> int:
    """The qemu-storage-daemon that serves the volume (the receive command's child)."""
    assert server.proc is not None
    found = subprocess.run(["pgrep", "-P", str(server.proc.pid), SERVING],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def test_stalled_nbd_server_fails_the_backup_not_the_guest() -> None:
    stall = 3  # seconds; the run waits it out more than once while the server stays stopped
    with lab_vm(loop_size=LOOP, lun_size=16 * MiB) as vm:
        server = VolumeServer(vm.workdir / "volume.img", export="vol")
        server.start(8 * LOOP)
        try:
            points = Points(vm, server.uri, disks=["vdb"])
            guest_write(vm.dom, "vdb", 0x41, 0, 4 * MiB)
            points.backup()
            tracked = dirty_bitmaps(vm.dom)
            for index in range(4):
                guest_write(vm.dom, "vdb", 0x50 + index, index * 8 * MiB, 8 * MiB)
            slow_reads(vm)
            proc = start_backup(vm, server.uri, "incremental",
                                RDM_BACKUP_STALL_TIMEOUT=str(stall))
            nbd_pid = serving_pid(server)
            os.kill(nbd_pid, signal.SIGSTOP)
            try:  # the server never answers again while the backup runs
                results = write_meanwhile(vm, 32 * MiB, 8, 0x60)
                assert_running(vm.dom)
                _out, err = proc.communicate(timeout=stall + 120)
            finally:
                os.kill(nbd_pid, signal.SIGCONT)
            assert [r for r in results if r is not None] == [], results
            assert_running(vm.dom)
            assert proc.returncode == 4, err
            # the error, after a warning that the stuck job's filter stays for the next run
            assert err.count("\n") <= 2 and "Traceback" not in err, err
            assert "no progress" in err.splitlines()[-1], err
            assert [m.backup_id for m in api.list_backups(server.uri)] == list(points.refs)
            assert tracked <= dirty_bitmaps(vm.dom)  # the last point's tracking is kept
            slow_reads(vm, 0)
            # the job stuck on the server, and its filter, go with the next run
            again = points.backup(level="incremental")
            assert again.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
            assert qemu_leftovers(vm.dom) == []
            assert points.restore_every_point() == 2
        finally:
            server.stop()


def test_full_fleecing_image_breaks_the_point_not_the_guest() -> None:
    with lab_vm(loop_size=LOOP, lun_size=16 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo, disks=["vdb"])
        guest_write(vm.dom, "vdb", 0x41, 0, 4 * MiB)
        points.backup()
        tracked = dirty_bitmaps(vm.dom)
        for index in range(6):
            guest_write(vm.dom, "vdb", 0x50 + index, index * 8 * MiB, 8 * MiB)
        scratch = vm.workdir / "scratch"
        with small_filesystem(vm.workdir / "scratch-fs.img", scratch, 32 * MiB):
            leave_free(scratch, 3 * MiB)  # the fleecing image runs full
            slow_reads(vm)
            proc = start_backup(vm, repo, "incremental", RDM_BACKUP_SCRATCH_DIR=str(scratch))
            results = write_meanwhile(vm, 48 * MiB, 12, 0x60)
            _out, err = proc.communicate(timeout=300)
        assert [r for r in results if r is not None] == [], results
        assert_running(vm.dom)
        assert proc.returncode == 4, err
        assert err.count("\n") == 1 and "point in time was given up" in err, err
        assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
        assert qemu_leftovers(vm.dom) == [] and dirty_bitmaps(vm.dom) == tracked
        slow_reads(vm, 0)
        again = points.backup(level="incremental")
        assert again.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
        assert points.restore_every_point() == 2


def drive_of(vm: LabVM, disk: str) -> str:
    """The block node the guest device of ``disk`` uses now."""
    alias = alias_of(vm.dom, disk)[0]
    for entry in qmp(vm.dom, "query-block"):  # type: ignore[attr-defined]
        if f"/{alias}/" in f"{entry.get('qdev')}/":
            return str(entry["inserted"]["node-name"])
    raise KeyError(disk)


def test_filter_left_by_a_killed_run_is_removed_by_the_next() -> None:
    with lab_vm(loop_size=LOOP, lun_size=16 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo, disks=["vdb"])
        own = drive_of(vm, "vdb")
        guest_write(vm.dom, "vdb", 0x41, 0, 4 * MiB)
        points.backup()
        for index in range(6):
            guest_write(vm.dom, "vdb", 0x50 + index, index * 8 * MiB, 8 * MiB)
        slow_reads(vm)
        proc = start_backup(vm, repo, "incremental")
        proc.kill()
        proc.communicate()
        # the guest writes through the filter the killed run left in front of its device
        assert drive_of(vm, "vdb").startswith("rdmb-cbw-")
        assert write_meanwhile(vm, 48 * MiB, 4, 0x60) == [None] * 4
        assert_running(vm.dom)
        slow_reads(vm, 0)
        again = points.backup(level="incremental")
        assert again.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
        assert drive_of(vm, "vdb") == own and qemu_leftovers(vm.dom) == []
        assert points.restore_every_point() == 2
