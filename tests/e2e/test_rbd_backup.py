"""A Ceph RBD disk backed up: through QEMU while the VM runs (full, incrementals from QEMU's dirty
bitmap, a resync after a VM restart), next to a loop LUN, and from the cluster while it is shut
off (full, resync); every point restored byte for byte."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api
from tools import cephkit, labkit
from tools.labkit import MiB, guest_write, qemu_leftovers, same_bytes

pytestmark = pytest.mark.lab

RBD_SIZE = 256 * MiB
LOOP_SIZE = 64 * MiB
CLUSTER = 64 * 1024


@dataclass
class RbdVM:
    """A firmware-only domain: vdb on an RBD image, vdc on a loop device."""

    dom: libvirt.virDomain
    image: cephkit.RbdImage
    loop_file: Path
    work: Path

    @property
    def name(self) -> str:
        return str(self.dom.name())


@pytest.fixture
def rbd_vm(ceph: None, run_token: str, rdmb_tmp: Path) -> Iterator[RbdVM]:
    loop_file = labkit.make_file(rdmb_tmp / "loop-lun.img", LOOP_SIZE)
    with cephkit.rbd_image(RBD_SIZE) as image, labkit.loop_device(loop_file) as loop:
        cephkit.write_pattern(image, 0, 8 * MiB, 0x11)  # some data before the first backup
        disks = [cephkit.rbd_disk("vdb", image), labkit.block_disk("vdc", loop)]
        with labkit.test_domain(f"rdmb-{run_token}-rbd-bk", disks) as dom:
            yield RbdVM(dom, image, loop_file, rdmb_tmp)


def write(vm: RbdVM, rng: random.Random, count: int) -> int:
    """``count`` guest writes of 64 KiB to vdb and one to vdc; the bytes written to vdb."""
    for _ in range(count):
        guest_write(vm.dom, "vdb", rng.randrange(1, 250),
                    rng.randrange(0, RBD_SIZE - CLUSTER, CLUSTER), CLUSTER)
    guest_write(vm.dom, "vdc", rng.randrange(1, 250),
                rng.randrange(0, LOOP_SIZE - CLUSTER, CLUSTER), CLUSTER)
    return count * CLUSTER


def references(vm: RbdVM, index: int) -> dict[str, Path]:
    """The disks' bytes now (guest paused while they are read)."""
    vm.dom.suspend()
    try:
        rbd_ref = cephkit.export(vm.image, vm.work / f"ref-{index}-vdb.raw")
        loop_ref = vm.work / f"ref-{index}-vdc.raw"
        loop_ref.write_bytes(vm.loop_file.read_bytes())
    finally:
        vm.dom.resume()
    return {"vdb": rbd_ref, "vdc": loop_ref}


def test_rbd_disk_full_and_incrementals_restore_byte_identical(rbd_vm: RbdVM) -> None:
    vm, rng = rbd_vm, random.Random(15)
    repo = str(vm.work / "repo")
    points = []
    # full, incremental, incremental; then the VM restarts (QEMU's bitmap is gone): resync
    expected = ["full", "incremental", "incremental", "resync"]
    for index, level in enumerate(["auto", "incremental", "auto", "auto"]):
        if index == 3:
            vm.dom.destroy()
            vm.dom.create()
        written = write(vm, rng, 5 + index)
        refs = references(vm, index)
        result = api.backup(vm.name, repo, level=level)
        points.append((result, refs))
        rbd_record = result.manifest.disk("vdb")
        assert rbd_record is not None and rbd_record.data_path == "qemu"
        assert rbd_record.disk.source_kind == "rbd"
        assert rbd_record.level == expected[index], rbd_record.reason
        if rbd_record.level == "incremental":
            assert 0 < rbd_record.bytes_transferred <= written + 2 * CLUSTER
        if rbd_record.level == "resync":
            assert "tracking was lost" in rbd_record.reason, rbd_record.reason
            assert rbd_record.stored_bytes <= written + 4 * MiB
        assert rbd_record.mapping is not None, rbd_record.mapping_error
        assert rbd_record.mapping.root.identity["image"] == vm.image.name
    for result, refs in points:
        for disk, ref in refs.items():
            out = vm.work / f"restore-{result.manifest.backup_id}-{disk}.raw"
            api.restore(vm.name, repo, disk, str(out), backup_id=result.manifest.backup_id)
            assert same_bytes(out, ref), f"{disk} of {result.manifest.backup_id} differs"
            out.unlink()
    assert qemu_leftovers(vm.dom) == []
    assert api.verify(repo).ok


def test_rbd_disk_of_a_shut_off_domain_is_read_from_the_cluster(ceph: None, run_token: str,
                                                                 rdmb_tmp: Path) -> None:
    """Full, then resync, read from the cluster (qemu-nbd or a storage daemon), each restored;
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
            assert disk["data_path"] == "storage", disk
            levels.append(disk["level"])
            out = rdmb_tmp / f"restore-{index}.raw"
            api.restore(name, repo, "vdb", str(out))
            assert same_bytes(out, ref), f"point {index} differs"
        assert levels == ["full", "resync"], levels
        assert json.loads(proc.stdout)["disks"][0]["stored_bytes"] <= 4 * MiB
    stored = [p for p in Path(repo).rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if key.encode() in p.read_bytes()]
