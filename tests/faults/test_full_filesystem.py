"""The repository's filesystem runs full (a small loop-mounted ext4), then grows again."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from tests.faults.points import Points
from tests.lab.domains import assert_running
from tests.oracles import unfinished_under
from tools.labkit import MiB, dirty_bitmaps, guest_write, lab_vm, qemu_leftovers, same_bytes

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"


@contextmanager
def small_filesystem(image: Path, mount: Path, size: int) -> Iterator[str]:
    """An ext4 of ``size`` bytes in ``image``, loop-mounted on ``mount``; yields the loop."""
    with open(image, "wb") as stream:
        stream.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    mount.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(mount)], check=True)
        try:
            yield loop
        finally:
            subprocess.run(["umount", str(mount)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def leave_free(mount: Path, free: int) -> Path:
    """Fill the filesystem with a ballast file until about ``free`` bytes are left."""
    ballast = mount / "ballast"
    stat = subprocess.run(["stat", "-f", "-c", "%a %S", str(mount)], check=True,
                          capture_output=True, text=True).stdout.split()
    available = int(stat[0]) * int(stat[1])
    subprocess.run(["fallocate", "-l", str(available - free), str(ballast)], check=True)
    return ballast


def test_repository_filesystem_runs_full_then_grows() -> None:
    with lab_vm(loop_size=256 * MiB, lun_size=32 * MiB) as vm:
        image = vm.workdir / "repo-fs.img"
        mount = vm.workdir / "mnt"
        with small_filesystem(image, mount, 384 * MiB):
            ballast = leave_free(mount, 48 * MiB)
            repo = str(mount / "repo")
            points = Points(vm, repo)
            for index in range(3):
                guest_write(vm.dom, "vdb", 0x40 + index, index * 16 * MiB, 4 * MiB)
            guest_write(vm.dom, "sda", 0x70, 0, 4 * MiB)
            points.backup()
            tracked = dirty_bitmaps(vm.dom)
            # far more changes than the filesystem has room for
            for index in range(10):
                guest_write(vm.dom, "vdb", 0x80 + index, index * 16 * MiB, 8 * MiB)
            guest_write(vm.dom, "sda", 0x71, 8 * MiB, 16 * MiB)
            for level in ("incremental", "auto", "full"):
                proc = subprocess.run([str(EXE), "backup", vm.name, "--target", repo,
                                       "--level", level], capture_output=True, text=True)
                assert proc.returncode == 4, proc.stderr
                assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
                assert "No space left" in proc.stderr or "no space" in proc.stderr.lower()
                assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
                assert qemu_leftovers(vm.dom) == []
                assert dirty_bitmaps(vm.dom) == tracked  # tracking kept, nothing new
                assert unfinished_under(repo) == []
            assert_running(vm.dom)
            # room again: the next incremental holds every change since the last good point
            ballast.unlink()
            result = points.backup(level="incremental")
            vdb = result.manifest.disk("vdb")
            assert vdb is not None and vdb.level == "incremental"
            assert points.restore_every_point() == 4


def test_restore_target_storage_runs_full() -> None:
    """A block device whose storage fills up under a restore: exit 4 naming the range that
    may have been changed; once there is room again, the same restore is byte-identical."""
    with lab_vm(loop_size=64 * MiB) as vm:
        guest_write(vm.dom, "vdb", 0x3C, 0, 8 * MiB)
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        backup_id = points.backup().manifest.backup_id
        with small_filesystem(vm.workdir / "target-fs.img", vm.workdir / "mnt", 32 * MiB):
            ballast = leave_free(vm.workdir / "mnt", 2 * MiB)
            sparse = vm.workdir / "mnt" / "device.raw"
            with open(sparse, "wb") as stream:
                stream.truncate(64 * MiB)
            device = subprocess.run(["losetup", "-f", "--show", str(sparse)], check=True,
                                    capture_output=True, text=True).stdout.strip()
            try:
                argv = [str(EXE), "restore", vm.name, "--target", repo, "--disk", "vdb",
                        "--to", device]
                proc = subprocess.run(argv, capture_output=True, text=True)
                assert proc.returncode == 4, proc.stderr
                assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
                assert f"bytes 0-{64 * MiB} of {device} may have been changed" in proc.stderr
                ballast.unlink()
                proc = subprocess.run(argv, capture_output=True, text=True)
                assert proc.returncode == 0, proc.stderr
                assert same_bytes(device, points.refs[backup_id]["vdb"])
            finally:
                subprocess.run(["losetup", "-d", device], check=False)
        assert points.restore_every_point() == 2  # vdb and sda
