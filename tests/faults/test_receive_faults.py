"""Faults of the backup server under a push: its filesystem fills up, ``receive`` is killed,
the volume file loses what was not flushed."""

from __future__ import annotations

import signal

import pytest

from libvirt_rdm_backup import api
from tests.faults.points import Points
from tests.lab.crash_fs import CrashFs, crash_fs
from tests.lab.domains import assert_running
from tests.lab.volume_server import VolumeServer
from tools.labkit import MiB, fill, guest_write, lab_vm, qemu_leftovers, rdmb_tmpdir

pytestmark = [pytest.mark.lab, pytest.mark.fault]


def crash(server: VolumeServer, fs: CrashFs) -> None:
    """The server host loses power: ``receive`` and its daemon die, every write the volume
    file's filesystem did not sync is lost; then it is served again."""
    server.stop(signal.SIGKILL)
    unsynced = fs.mount / "unsynced"
    unsynced.write_bytes(b"x" * MiB)
    fs.crash()
    assert not unsynced.exists(), "the crash kept writes that were never synced"
    server.start()


@pytest.mark.parametrize("fault", ["filesystem_full", "receive_killed", "unflushed_lost"])
def test_backup_server_fault_mid_push(fault: str) -> None:
    with rdmb_tmpdir() as work, crash_fs(work, 256 * MiB) as fs, \
            lab_vm(loop_size=64 * MiB, lun_size=16 * MiB) as vm:
        server = VolumeServer(fs.mount / "volume.img", export="vol")
        server.start()
        try:
            points = Points(vm, server.uri)
            fill(vm, 2)
            points.backup(disks=["vdb"])
            fill(vm, 1, first=10)
            points.backup(disks=["vdb"], level="incremental")  # published just before the fault
            if fault == "unflushed_lost":  # the server crashes right after a publish
                crash(server, fs)
                assert [m.backup_id for m in api.list_backups(server.uri)] == list(points.refs)

            guest_write(vm.dom, "vdb", 0x71, 0, 64 * MiB)  # all of it to push again
            proc = points.start_slowed(
                "vdb", lambda: guest_write(vm.dom, "vdb", 0x71, 0, 64 * MiB),
                "--disk", "vdb", "--level", "full")
            ballast = None
            if fault == "filesystem_full":
                ballast = fs.fill()
            else:
                server.stop(signal.SIGKILL)
            _out, err = proc.communicate(timeout=300)
            assert proc.returncode == 4, err
            assert err.count("\n") == 1 and "Traceback" not in err
            if fault == "filesystem_full":
                assert "No space left on device" in err, err
            if fault == "unflushed_lost":
                crash(server, fs)
            elif fault == "receive_killed":
                server.start()
            assert [m.backup_id for m in api.list_backups(server.uri)] == list(points.refs)
            report = api.verify(server.uri)
            assert report.ok and len(report.checks) == len(points.refs)
            assert qemu_leftovers(vm.dom) == []
            assert_running(vm.dom)

            # room again / served again: the next backup holds every change
            if ballast is not None:
                ballast.unlink()
            after = points.backup(disks=["vdb"], level="incremental")
            assert after.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
            assert points.restore_every_point() == len(points.refs)
        finally:
            server.stop()
