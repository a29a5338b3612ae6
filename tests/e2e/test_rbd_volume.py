"""An RBD disk backed up into an NBD volume through RBD snapshots: full, incremental, a VM
restart, incremental again (the ranges ``diff_iterate`` reports, copied from the snapshot into
a qcow2 layer of the volume, zeroes included), while the loop device beside it (QEMU's bitmap,
lost with the restart) takes a resync compared with its last point read back from the volume;
every point of both disks restored byte for byte."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from tests.e2e.test_rbd_target import CLUSTER
from tests.lab.volume_server import VolumeServer
from tools import cephkit, labkit
from tools.labkit import MiB, guest_write, same_bytes

pytestmark = pytest.mark.lab

SIZE = 16 * MiB


@pytest.fixture
def vm_and_volume(ceph: None, run_token: str, rdmb_tmp: Path
                  ) -> Iterator[tuple[cephkit.RbdLoopVM, VolumeServer]]:
    server = VolumeServer(rdmb_tmp / "volume.img", size=1 << 30)
    server.start()
    try:
        with cephkit.rbd_and_loop_vm(f"rdmb-{run_token}-rbdvol", rdmb_tmp, SIZE, SIZE,
                                     4 * MiB) as vm:
            yield vm, server
    finally:
        server.stop()


def test_rbd_disk_stays_incremental_in_a_volume_after_a_restart(
        vm_and_volume: tuple[cephkit.RbdLoopVM, VolumeServer]) -> None:
    vm, server = vm_and_volume
    rng = random.Random(41)
    points: list[tuple[str, dict[str, Path]]] = []
    levels = []
    for index in range(3):
        if index == 2:
            vm.dom.destroy()
            vm.dom.create()
        if index:
            for disk in ("vdb", "vdc"):
                for _ in range(4):
                    guest_write(vm.dom, disk, rng.randrange(1, 250),
                                rng.randrange(0, SIZE - CLUSTER, CLUSTER), CLUSTER)
            guest_write(vm.dom, "vdb", 0, index * CLUSTER, CLUSTER)  # 0x11 data made zero
        refs = cephkit.references(vm, index)
        result = api.backup(vm.name, server.uri, level="auto")
        records = {d: result.manifest.disk(d) for d in ("vdb", "vdc")}
        levels.append({d: (r.level, r.data_path) for d, r in records.items() if r})
        for record in records.values():
            if index and record is not None:  # 5 writes of 64 KiB, not the disk
                assert record.bytes_transferred <= 8 * CLUSTER and record.stored_bytes < MiB, \
                    record
        points.append((result.manifest.backup_id, refs))
    assert levels == [
        {"vdb": ("full", "snapshot"), "vdc": ("full", "qemu")},
        {"vdb": ("incremental", "snapshot"), "vdc": ("incremental", "qemu")},
        {"vdb": ("incremental", "snapshot"), "vdc": ("resync", "qemu")}], levels
    for backup_id, refs in points:
        for disk, ref in refs.items():
            out = vm.work / f"out-{backup_id}-{disk}.raw"
            proc = labkit.rdm_backup("restore", vm.name, "--target", server.uri, "--disk",
                                     disk, "--to", str(out), "--backup", backup_id)
            assert proc.returncode == 0, proc.stderr
            assert same_bytes(out, ref), f"{disk} of {backup_id}"
            out.unlink()
