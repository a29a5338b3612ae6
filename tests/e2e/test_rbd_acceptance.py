"""Acceptance of RBD disks beside LUNs: a VM with vdb on an RBD image, vdc on a loop device and
sda on an iSCSI LUN of tgtd. Three points (full; writes to every disk, incremental; a VM
restart, writes, incremental again: still an incremental for the RBD disk, from RBD snapshots),
each backed up into a file repository and into an ``rbd://`` target; every point of every disk
restored from both byte for byte; ``--to-original`` puts every disk back (the RBD disk into its
own image); a ``prune --keep-last 1`` on the target gives space back (``rbd du``) and leaves one
snapshot per image."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.restore_all import DisksRequest
from tests.e2e.test_rbd_target import TargetVM, _remove_target, cli, rbd_du
from tools import cephkit, labkit
from tools.labkit import MiB, guest_write, same_bytes

pytestmark = pytest.mark.lab

SIZE = 16 * MiB
CLUSTER = 64 * 1024
DISKS = ("vdb", "vdc", "sda")


@dataclass
class AcceptanceVM(TargetVM):
    """The VM, its rbd:// target, and the file behind its iSCSI LUN."""

    lun_file: Path

    @property
    def repo(self) -> str:
        return str(self.work / "repo")


@pytest.fixture
def acceptance_vm(ceph: None, run_token: str, rdmb_tmp: Path) -> Iterator[AcceptanceVM]:
    prefix = f"rdmb-{run_token}-acc"
    lun_file = labkit.make_file(rdmb_tmp / "iscsi-lun.img", SIZE, b"lun")
    try:
        with labkit.iscsi_target(lun_file) as lun, cephkit.rbd_and_loop_vm(
                f"rdmb-{run_token}-rbdacc", rdmb_tmp, SIZE, SIZE, 4 * MiB,
                extra=(labkit.iscsi_disk("sda", lun.iqn, lun.lun, device="lun"),)) as vm:
            yield AcceptanceVM(vm.dom, vm.image, vm.loop_file, vm.work, prefix, lun_file)
    finally:
        _remove_target(prefix)


def write(vm: AcceptanceVM, rng: random.Random, offsets: list[int]) -> None:
    """Guest writes of 64 KiB at ``offsets`` to every disk (the same offsets at each point:
    later points overwrite what earlier ones hold)."""
    for disk in DISKS:
        for offset in offsets:
            guest_write(vm.dom, disk, rng.randrange(1, 250), offset, CLUSTER)


def references(vm: AcceptanceVM, index: int) -> dict[str, Path]:
    """Every disk's bytes now (the firmware-only guest writes nothing of its own)."""
    refs = cephkit.references(vm, index)
    refs["sda"] = vm.work / f"ref-{index}-sda.raw"
    shutil.copyfile(vm.lun_file, refs["sda"])
    return refs


def backup(vm: AcceptanceVM, target: str, level: str) -> tuple[str, dict[str, str]]:
    """The backup's id and each disk's level."""
    result = json.loads(cli("backup", vm.name, "--target", target, "--level", level,
                            "--json").stdout)
    return result["backup_id"], {d["disk"]: d["level"] for d in result["disks"]}


def restore_points(vm: AcceptanceVM, target: str,
                   points: list[tuple[str, dict[str, Path]]]) -> None:
    """Every disk of every point, into new files, compared with the references."""
    for backup_id, refs in points:
        out = vm.work / f"out-{backup_id}"
        out.mkdir()
        api.restore_many(vm.name, target, DisksRequest(to_dir=str(out)), backup_id=backup_id)
        for disk in DISKS:
            assert same_bytes(out / f"{disk}.raw", refs[disk]), f"{disk} of {backup_id}"
        shutil.rmtree(out)


def current(vm: AcceptanceVM) -> dict[str, Path]:
    """The disks' bytes now (the domain shut off)."""
    here = {"vdb": cephkit.export(vm.image, vm.work / "now-vdb.raw"),
            "vdc": vm.work / "now-vdc.raw", "sda": vm.work / "now-sda.raw"}
    shutil.copyfile(vm.loop_file, here["vdc"])
    shutil.copyfile(vm.lun_file, here["sda"])
    return here


def target_snapshots(vm: AcceptanceVM) -> dict[str, int]:
    """The target's images and how many snapshots each has."""
    import rbd

    found = {}
    with cephkit.ioctx() as ctx:
        for name in rbd.RBD().list(ctx):
            if name.startswith(f"{vm.prefix}."):
                with rbd.Image(ctx, name, read_only=True) as image:
                    found[name] = len(list(image.list_snaps()))
    return found


def test_rbd_disk_beside_luns_from_backup_to_prune(acceptance_vm: AcceptanceVM) -> None:
    vm, rng = acceptance_vm, random.Random(23)
    key = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text() \
        .split("key = ")[1].split()[0]
    offsets = [rng.randrange(0, SIZE - CLUSTER, CLUSTER) for _ in range(4)]
    files: list[tuple[str, dict[str, Path]]] = []
    onrbd: list[tuple[str, dict[str, Path]]] = []
    levels = []
    for index, level in enumerate(["full", "incremental", "incremental"]):
        if index == 2:
            vm.dom.destroy()
            vm.dom.create()
        write(vm, rng, offsets)
        refs = references(vm, index)
        backup_id, in_file = backup(vm, vm.repo, level if index < 2 else "auto")
        files.append((backup_id, refs))
        backup_id, in_rbd = backup(vm, vm.target, level if index < 2 else "auto")
        onrbd.append((backup_id, refs))
        levels.append((in_file, in_rbd))
    full = dict.fromkeys(DISKS, "full")
    incremental = {"vdb": "incremental", "vdc": "incremental", "sda": "full"}  # sda: passthrough
    # in the file repository the RBD disk's point comes from RBD snapshots: an incremental after
    # the restart too, where the loop device's QEMU bitmap is gone (a resync)
    assert [f for f, _ in levels] == [full, incremental, {**incremental, "vdc": "resync"}], levels
    # an rbd:// target takes the ranges RBD reports as changed (written onto its image) but no
    # resync (ceph.md): the RBD disk an incremental after the restart, the loop device a full
    assert [r for _, r in levels] == [full, incremental, {**full, "vdb": "incremental"}], levels

    restore_points(vm, vm.repo, files)
    restore_points(vm, vm.target, onrbd)

    # every disk back to its original device, the RBD disk into its own image
    vm.dom.destroy()
    proc = cli("-vv", "restore", vm.name, "--target", vm.repo, "--all-disks", "--to-original",
               "--backup", files[0][0], "--json")
    assert key not in proc.stdout + proc.stderr
    where = {d["disk"]: d for d in json.loads(proc.stdout)["disks"]}
    assert where["vdb"]["path"] == f"rbd:{vm.image.spec}", where
    assert where["vdb"]["matched_on"].startswith("RBD image id "), where
    assert where["sda"]["path"].startswith("iscsi://"), where
    now = current(vm)
    for disk in DISKS:
        assert same_bytes(now[disk], files[0][1][disk]), f"{disk} back to the first point"
    cli("restore", vm.name, "--target", vm.target, "--disk", "vdb", "--to-original",
        "--backup", onrbd[-1][0])
    assert same_bytes(cephkit.export(vm.image, vm.work / "last.raw"), onrbd[-1][1]["vdb"])

    before, snaps = rbd_du(vm), target_snapshots(vm)
    print(f"target images and their snapshots before prune: {snaps}")
    cli("prune", vm.name, "--target", vm.target, "--keep-last", "1")
    after = rbd_du(vm)
    assert after < before, (before, after)
    assert target_snapshots(vm) == dict.fromkeys(snaps, 1)
    listed = json.loads(cli("list", vm.name, "--target", vm.target, "--json").stdout)
    assert [b["backup_id"] for b in listed] == [onrbd[-1][0]]
    print(f"levels (file, rbd://) per point: {levels}; rbd du of the target before prune "
          f"{before}, after {after}")
