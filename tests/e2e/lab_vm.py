"""The acceptance VM: a loop LUN (with an offset), an iSCSI LUN on tgtd, a qcow2 system disk."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt

from tests.lab.domains import block_disk, guest_write, iscsi_disk, qcow2_disk, test_domain
from tests.lab.storage_lab import (
    IscsiLun,
    iscsi_target,
    loop_device,
    rdmb_reflink_tmpdir,
    rdmb_tmpdir,
    unique_name,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
LOOP_OFFSET = 3 * MiB


@dataclass
class LabVM:
    """Handles to everything the acceptance VM is made of."""

    dom: libvirt.virDomain
    name: str
    uuid: str
    workdir: Path
    loop: str
    loop_file: Path
    iscsi: IscsiLun
    iscsi_file: Path
    qcow2: Path


@contextmanager
def lab_vm(loop_size: int = GiB, lun_size: int = 64 * MiB, start: bool = True,
           sizelimit: bool = True, reflink: bool = False) -> Iterator[LabVM]:
    """Build the VM and tear every piece of it down afterwards.

    ``reflink``: the LUNs' backing files live on the lab's reflink XFS, so the
    storage agents can take snapshots of them.
    """
    with ExitStack() as stack:
        workdir = stack.enter_context(rdmb_reflink_tmpdir() if reflink else rdmb_tmpdir())
        loop_file = workdir / "loop-lun.img"
        with open(loop_file, "wb") as stream:
            stream.truncate(LOOP_OFFSET + loop_size + (MiB if sizelimit else 0))
        iscsi_file = workdir / "iscsi-lun.img"
        with open(iscsi_file, "wb") as stream:
            stream.truncate(lun_size)
        qcow2 = workdir / "system.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
        loop = stack.enter_context(loop_device(loop_file, offset=LOOP_OFFSET,
                                               sizelimit=loop_size if sizelimit else 0))
        lun = stack.enter_context(iscsi_target(iscsi_file))
        name = unique_name("rdmb-vm")
        disks = [
            qcow2_disk("vda", str(qcow2)),
            block_disk("vdb", loop, serial="RDMBLOOP1"),
            iscsi_disk("sda", lun.iqn, lun.lun, device="lun"),
        ]
        dom = stack.enter_context(test_domain(name, disks, start=start))
        yield LabVM(dom=dom, name=name, uuid=dom.UUIDString(), workdir=workdir, loop=loop,
                    loop_file=loop_file, iscsi=lun, iscsi_file=iscsi_file, qcow2=qcow2)


def snapshot_source(vm: LabVM, dest: Path) -> dict[str, Path]:
    """Raw copies of both raw disks as they are now (the caller keeps the guest still)."""
    dest.mkdir(parents=True, exist_ok=True)
    refs = {"vdb": dest / "vdb.raw", "sda": dest / "sda.raw"}
    subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", vm.loop,
                    str(refs["vdb"])], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", vm.iscsi.url,
                    str(refs["sda"])], check=True)
    return refs


def same_bytes(first: Path | str, second: Path | str) -> bool:
    """Byte-for-byte comparison of two raw images (``cmp`` reads them in large blocks)."""
    return subprocess.run(["cmp", "-s", str(first), str(second)], check=False).returncode == 0


def fill(vm: LabVM, pieces: int, first: int = 0) -> None:
    """``pieces`` guest writes of 8 MiB spread over vdb (every 16 MiB), patterns from ``first``."""
    for index in range(pieces):
        guest_write(vm.dom, "vdb", 0x20 + (first + index) % 200, index * 16 * MiB, 8 * MiB)
