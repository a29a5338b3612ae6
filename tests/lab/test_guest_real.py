"""The tiny real guest (tools/guestkit.py): its disks, its writes, its agent, fsfreeze.

One guest per module with three disks: a loop LUN as virtio ``vda``, a small loop device as
virtio ``vdb`` (the test puts ext2 on it for fsfreeze), and an iSCSI LUN on tgtd as
``device='lun'`` on virtio-scsi (``sda`` in the guest).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tools.guestkit import Guest, guest_vm
from tools.labkit import (
    IscsiLun,
    block_disk,
    is_root,
    iscsi_disk,
    iscsi_target,
    loop_device,
    rdmb_tmpdir,
    unique_name,
)

pytestmark = pytest.mark.lab
MiB = 1 << 20
VDA_SIZE = 64 * MiB
VDB_SIZE = 32 * MiB
LUN_SIZE = 64 * MiB


@dataclass
class GuestLab:
    guest: Guest
    vda_file: Path
    vda_loop: str
    vdb_loop: str
    lun: IscsiLun
    lun_file: Path


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as stream:
        stream.truncate(size)
    return path


@pytest.fixture(scope="module")
def lab() -> Iterator[GuestLab]:
    if not is_root():
        pytest.skip("needs root (loop devices, tgtadm, libvirt)")
    with ExitStack() as stack:
        workdir = stack.enter_context(rdmb_tmpdir())
        vda_file = _sparse(workdir / "vda.img", VDA_SIZE)
        vdb_file = _sparse(workdir / "vdb.img", VDB_SIZE)
        lun_file = _sparse(workdir / "lun.img", LUN_SIZE)
        vda_loop = stack.enter_context(loop_device(vda_file))
        vdb_loop = stack.enter_context(loop_device(vdb_file))
        lun = stack.enter_context(iscsi_target(lun_file))
        disks = [
            block_disk("vda", vda_loop, serial="RDMBVDA"),
            block_disk("vdb", vdb_loop, serial="RDMBVDB"),
            iscsi_disk("sda", lun.iqn, lun.lun, device="lun"),
        ]
        guest = stack.enter_context(guest_vm(unique_name("rdmb-guest"), disks))
        print(f"\nguest {guest.name} answered {guest.boot_seconds:.1f} s after create()")
        yield GuestLab(guest, vda_file, vda_loop, vdb_loop, lun, lun_file)


def _read(path: Path | str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_boots_within_a_minute(lab: GuestLab) -> None:
    assert lab.guest.boot_seconds is not None and lab.guest.boot_seconds < 60
    rc, out = lab.guest.run("uname -r; echo hello >&2; exit 7")
    assert rc == 7
    assert out.splitlines()[-1] == "hello"
    assert lab.guest.run("printf 'no newline'") == (0, "no newline")
    assert lab.guest.run("echo 'a\"b' && echo \"$((6*7))\"") == (0, 'a"b\n42\n')


def test_disks_show_up(lab: GuestLab) -> None:
    g = lab.guest
    for dev in ("vda", "vdb", "sda"):
        g.wait_path(f"/sys/block/{dev}")
    assert g.check("cat /sys/block/vda/serial").strip() == "RDMBVDA"
    assert g.check("cat /sys/block/vdb/serial").strip() == "RDMBVDB"
    sizes = {dev: int(g.check(f"cat /sys/block/{dev}/size")) * 512 for dev in ("vda", "sda")}
    assert sizes == {"vda": VDA_SIZE, "sda": LUN_SIZE}
    # device='lun' is SCSI passthrough: the guest talks to tgtd's LUN itself
    assert g.check("cat /sys/block/sda/device/vendor").strip() == "IET"


def test_guest_writes_reach_the_backing_files(lab: GuestLab) -> None:
    g = lab.guest
    g.wait_path("/sys/block/sda")
    g.dd_write("/dev/vda", MiB, 64 * 1024, 0xAB)
    g.dd_write("/dev/sda", 2 * MiB, 128 * 1024, 0xCD, direct=True)
    assert _read(lab.vda_file, MiB, 64 * 1024) == b"\xab" * (64 * 1024)
    assert _read(lab.vda_file, MiB + 64 * 1024, 4096) == bytes(4096)
    assert _read(lab.lun_file, 2 * MiB, 128 * 1024) == b"\xcd" * (128 * 1024)
    assert _read(lab.lun_file, 2 * MiB - 4096, 4096) == bytes(4096)


def test_agent_and_fsfreeze_on_ext2(lab: GuestLab) -> None:
    g = lab.guest
    g.wait_agent(30)
    assert g.agent("guest-ping") == {}
    g.check("mke2fs /dev/vdb >/dev/null 2>&1 && mkdir -p /mnt/fs && "
            "mount -t ext2 /dev/vdb /mnt/fs && echo before > /mnt/fs/before && sync")
    frozen = False
    try:
        assert lab.guest.dom.fsFreeze() == 1
        frozen = True
        assert g.agent("guest-fsfreeze-status") == "frozen"
        # a write to the frozen fs blocks until the thaw
        g.check("(echo during > /mnt/fs/during; touch /run/written) >/dev/null 2>&1 &")
        time.sleep(1.5)
        assert g.run("test -e /run/written")[0] == 1
        assert lab.guest.dom.fsThaw() == 1
        frozen = False
        assert g.agent("guest-fsfreeze-status") == "thawed"
        g.wait_path("/run/written", 10)
        assert g.check("cat /mnt/fs/before /mnt/fs/during") == "before\nduring\n"
        # the raw agent commands as well
        assert g.agent("guest-fsfreeze-freeze") == 1
        frozen = True
        assert g.agent("guest-fsfreeze-thaw") == 1
        frozen = False
    finally:
        if frozen:
            try:
                lab.guest.dom.fsThaw()
            except libvirt.libvirtError:
                pass
        g.run("umount /mnt/fs")


def test_write_loop_in_the_guest_while_the_host_reads(lab: GuestLab, tmp_path: Path) -> None:
    g = lab.guest
    offset = 4 * MiB
    # the writer stops at a flag and says so (a killed job's exit is not seen reliably: its
    # zombie belongs to the guest's PID 1 shell, which reaps it only now and then)
    g.check(
        "rm -f /run/writer-stop /run/writer-stopped; i=0; "
        "(while [ ! -e /run/writer-stop ]; do i=$((i+1)); printf '%016d' $i | "
        f"dd of=/dev/vda bs=4096 seek={offset // 4096} conv=notrunc,fsync; "
        "done; touch /run/writer-stopped) >/dev/null 2>&1 &"
    )
    try:
        counters: list[int] = []
        copy = tmp_path / "vda.copy"
        for _ in range(3):
            time.sleep(0.5)
            # the whole disk, through the loop device (O_DIRECT: no stale host page cache)
            subprocess.run(
                ["dd", f"if={lab.vda_loop}", f"of={copy}", "bs=1M", "iflag=direct",
                 "status=none"],
                check=True, timeout=60,
            )
            counters.append(int(_read(copy, offset, 16)))
        assert counters[0] > 0
        assert counters == sorted(counters) and counters[0] < counters[-1], counters
        assert int(_read(lab.vda_file, offset, 16)) >= counters[-1]
    finally:
        g.run("touch /run/writer-stop")
    g.wait_path("/run/writer-stopped", 60)
    last = _read(lab.vda_file, offset, 16)
    time.sleep(0.5)
    assert _read(lab.vda_file, offset, 16) == last
