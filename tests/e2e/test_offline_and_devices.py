"""Full backups of a shut-off domain, restores onto block devices, failures that publish nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.restore import CHUNK as ZERO_CHECK_CHUNK
from libvirt_rdm_backup.errors import OperationError
from tests.lab.domains import assert_running
from tools.labkit import (
    MiB,
    guest_write,
    lab_vm,
    loop_device,
    rdm_backup,
    same_bytes,
    snapshot_source,
)

pytestmark = pytest.mark.lab


def fill_host_side(path: Path, offset: int, pattern: int, length: int) -> None:
    """Write a pattern straight into a LUN's backing file (no QEMU involved)."""
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(bytes([pattern]) * length)


def test_shut_off_domain_is_copied_from_storage() -> None:
    with lab_vm(loop_size=256 * MiB, start=False) as vm:
        fill_host_side(vm.loop_file, 3 * MiB + 7 * MiB, 0x42, 3 * MiB)
        fill_host_side(vm.iscsi_file, 5 * MiB, 0x24, MiB)
        refs = snapshot_source(vm, vm.workdir / "ref")
        repo = str(vm.workdir / "repo")
        result = api.backup(vm.name, repo)
        assert result.manifest.consistency["method"] == "offline"
        assert {d.disk.target: d.data_path for d in result.manifest.disks} == {
            "vdb": "storage", "sda": "storage"}
        assert {d.disk.target: d.size for d in result.manifest.disks} == {
            "vdb": 256 * MiB, "sda": 64 * MiB}
        for disk in ("vdb", "sda"):
            out = vm.workdir / f"out-{disk}.raw"
            api.restore(vm.uuid, repo, disk, str(out))
            assert same_bytes(out, refs[disk])
        inventory = api.discover(vm.name)
        assert not inventory.running and {d.target for d in inventory.raw} == {"vdb", "sda"}
        assert [m.backup_id for m in api.list_backups(repo, vm.name)] == [
            result.manifest.backup_id]
        assert api.verify(repo, vm.uuid).ok


def test_restore_onto_a_block_device_overwrites_old_data() -> None:
    with lab_vm(loop_size=128 * MiB) as vm:
        guest_write(vm.dom, "vdb", 0x11, 0, MiB)
        guest_write(vm.dom, "vdb", 0x22, 100 * MiB, 64 * 1024)
        repo = str(vm.workdir / "repo")
        vm.dom.suspend()
        try:
            refs = snapshot_source(vm, vm.workdir / "ref")
        finally:
            vm.dom.resume()
        api.backup(vm.name, repo, disks=["vdb"])

        # an old, dirty device: data everywhere the backup has zeros
        dev_file = vm.workdir / "restore-dev.img"
        subprocess.run(["dd", "if=/dev/urandom", f"of={dev_file}", "bs=1M", "count=128",
                        "status=none"], check=True)
        with loop_device(dev_file) as device:
            proc = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb",
                              "--to", device, "--json")
            assert proc.returncode == 0, proc.stderr
            doc = json.loads(proc.stdout)
            assert doc["zeroed_bytes"] > 0
            assert same_bytes(device, refs["vdb"])

            # restoring again: zeros go only where the device does not read as zero,
            # which now is just the chunks that hold the disk's data
            again = json.loads(rdm_backup("restore", vm.name, "--target", repo, "--disk",
                                          "vdb", "--to", device, "--json").stdout)
            assert 0 < again["zeroed_bytes"] <= 2 * ZERO_CHECK_CHUNK < doc["zeroed_bytes"]
            assert same_bytes(device, refs["vdb"])


def test_restore_force_into_smaller_and_existing_files() -> None:
    with lab_vm(loop_size=64 * MiB) as vm:
        guest_write(vm.dom, "vdb", 0x33, 60 * MiB, MiB)
        guest_write(vm.dom, "vdb", 0x44, 0, MiB)
        repo = str(vm.workdir / "repo")
        api.backup(vm.name, repo, disks=["vdb"])
        existing = vm.workdir / "existing.raw"
        subprocess.run(["dd", "if=/dev/urandom", f"of={existing}", "bs=1M", "count=80",
                        "status=none"], check=True)
        api.restore(vm.name, repo, "vdb", str(existing))
        assert os.path.getsize(existing) == 80 * MiB  # the bytes after the disk stay
        assert same_bytes(existing, vm.loop) is False  # longer than the disk ...
        head = vm.workdir / "head.raw"
        subprocess.run(["head", "-c", str(64 * MiB), str(existing)], check=True,
                       stdout=open(head, "wb"))
        assert same_bytes(head, vm.loop)  # ... but its first 64 MiB are the disk

        small = vm.workdir / "small.raw"
        small.write_bytes(b"x" * MiB)
        proc = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb", "--to",
                          str(small), "--force")
        assert proc.returncode == 0, proc.stderr
        assert same_bytes(small, vm.loop)


@pytest.mark.fault
def test_failed_backup_publishes_nothing(rdmb_tmp: Path) -> None:
    mount = rdmb_tmp / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "rdmb-tiny", str(mount)],
                   check=True)
    try:
        with lab_vm(loop_size=128 * MiB) as vm:
            for index in range(8):
                guest_write(vm.dom, "vdb", 0x60 + index, index * 8 * MiB, MiB)
            repo = mount / "repo"
            with pytest.raises(OperationError):
                api.backup(vm.name, str(repo), disks=["vdb"])
            assert api.list_backups(str(repo)) == []
            leftovers = [p.name for p in (repo / vm.uuid).iterdir()
                         if p.name not in (".lock", ".prune.lock")]
            assert leftovers == []
            # QEMU is clean again: no node, job or fd of ours is left
            nodes = json.loads(subprocess.run(
                ["virsh", "qemu-monitor-command", vm.name, '{"execute":"query-named-block-nodes"}'],
                capture_output=True, text=True, check=True).stdout)["return"]
            assert not [n["node-name"] for n in nodes if n["node-name"].startswith("rdmb-")]
            jobs = json.loads(subprocess.run(
                ["virsh", "qemu-monitor-command", vm.name, '{"execute":"query-jobs"}'],
                capture_output=True, text=True, check=True).stdout)["return"]
            assert jobs == []
            # and the CLI reports it in one line with exit 4
            proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb")
            assert proc.returncode == 4 and proc.stderr.count("\n") == 1
            assert_running(vm.dom)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
