"""Who uses a disk: holders from sysfs and mounts from /proc, on fixture trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_rdm_backup import device_use
from libvirt_rdm_backup.device_use import Identity

DISK = Identity("b", os.makedev(8, 16))  # sdb
PART = Identity("b", os.makedev(8, 17))  # sdb1


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/sys/dev/block with sdb and its partition sdb1, and an empty /proc/self."""
    sys_block = tmp_path / "sys" / "dev" / "block"
    disk = sys_block / "8:16"
    (disk / "holders").mkdir(parents=True)
    (disk / "dev").write_text("8:16\n")
    part = disk / "sdb1"
    (part / "holders").mkdir(parents=True)
    (part / "dev").write_text("8:17\n")
    (part / "partition").write_text("1\n")
    (sys_block / "8:17").symlink_to(part)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n")
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    monkeypatch.setattr(device_use, "SYS_DEV_BLOCK", str(sys_block))
    monkeypatch.setattr(device_use, "SYS_BLOCK", str(tmp_path / "sys" / "block"))
    monkeypatch.setattr(device_use, "PROC", str(proc))
    return tmp_path


def test_an_unused_disk_has_no_holders(tree: Path) -> None:
    assert device_use.partitions(DISK) == [PART]
    assert device_use.holders(DISK) == []


def test_a_mounted_partition_makes_the_whole_disk_busy(tree: Path) -> None:
    with open(tree / "proc" / "self" / "mountinfo", "a") as stream:
        stream.write("40 22 8:17 / /srv/with\\040space rw - xfs /dev/sdb1 rw\n")
    assert device_use.holders(DISK) == ["mounted at /srv/with space"]
    assert device_use.holders(PART) == ["mounted at /srv/with space"]


def test_stacked_devices_are_holders(tree: Path) -> None:
    (tree / "sys" / "dev" / "block" / "8:16" / "sdb1" / "holders" / "dm-3").mkdir()
    (tree / "sys" / "dev" / "block" / "8:16" / "holders" / "md127").mkdir()
    assert sorted(device_use.holders(DISK)) == [
        "held by dm-3 (md, dm or LVM)", "held by md127 (md, dm or LVM)"]


def test_names_from_the_kernel_are_shown_on_one_line(tree: Path) -> None:
    with open(tree / "proc" / "self" / "mountinfo", "a") as stream:
        stream.write("40 22 8:16 / /mnt/a\\012b rw - xfs /dev/sdb rw\n")
    assert device_use.holders(DISK) == ["mounted at /mnt/a\\nb"]


def test_the_identity_of_a_path_is_what_the_kernel_opens(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(path)
    assert device_use.identity_of_path(str(link)) == device_use.identity_of_path(str(path))
    assert device_use.identity_of_path(str(tmp_path)) is None  # a directory is neither
    assert device_use.identity_of_path(str(tmp_path / "gone")) is None


def test_loop_devices_over_a_file_and_over_them_are_found(tree: Path) -> None:
    image = tree / "disk.raw"
    image.write_bytes(b"x")
    sys_block = tree / "sys" / "block"
    for name, number, backing in (("loop4", "7:4", str(image)), ("loop5", "7:5", "/dev/null"),
                                  ("loop6", "7:6", None)):
        (sys_block / name / "loop").mkdir(parents=True)
        (sys_block / name / "dev").write_text(number + "\n")
        if backing is not None:
            (sys_block / name / "loop" / "backing_file").write_text(backing + "\n")
    ident = device_use.identity_of_path(str(image))
    assert ident is not None
    assert device_use.loops_over(ident) == [Identity("b", os.makedev(7, 4))]


def test_a_loop_device_over_a_partition_of_the_disk_is_found(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = Identity("b", os.makedev(7, 0))
    monkeypatch.setattr(device_use, "_loop_backings", lambda: [(loop, PART)])
    assert device_use.loops_over(DISK) == [loop]
    assert device_use.loops_over(PART) == [loop]
