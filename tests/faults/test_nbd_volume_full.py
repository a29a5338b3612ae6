"""An NBD volume target runs full, and is served again with more room."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.targets.volume_format import region_size
from tests.faults.points import Points
from tests.lab.volume_server import VolumeServer
from tools.labkit import LabVM, MiB, dirty_bitmaps, guest_write, lab_vm, qemu_leftovers, same_bytes

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"
LOOP = 128 * MiB


def backup_cli(vm: LabVM, target: str, level: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), "backup", vm.name, "--target", target, "--disk", "vdb",
                           "--level", level], capture_output=True, text=True)


def test_nbd_volume_runs_full_and_grows() -> None:
    with lab_vm(loop_size=LOOP, lun_size=16 * MiB) as vm:
        receiver = VolumeServer(vm.workdir / "volume.img", export="vol")
        # room for one backup of vdb and its manifest, not for a second one
        receiver.start(4 * MiB + region_size(LOOP) + 2 * MiB)
        try:
            points = Points(vm, receiver.uri)
            guest_write(vm.dom, "vdb", 0x41, 0, 4 * MiB)
            refs = points.reference("first")
            first = api.backup(vm.name, receiver.uri, disks=["vdb"])
            tracked = dirty_bitmaps(vm.dom)
            guest_write(vm.dom, "vdb", 0x42, 32 * MiB, 4 * MiB)
            for level in ("incremental", "full"):
                proc = backup_cli(vm, receiver.uri, level)
                assert proc.returncode == 4, proc.stderr
                assert proc.stderr.count("\n") == 1 and "is full" in proc.stderr
                assert [m.backup_id for m in api.list_backups(receiver.uri)] == [
                    first.manifest.backup_id]
                assert qemu_leftovers(vm.dom) == [] and dirty_bitmaps(vm.dom) == tracked
            # served again with more room: the next incremental has every change
            receiver.stop()
            receiver.start(4 * MiB + 3 * region_size(LOOP))
            later = points.reference("second")
            again = api.backup(vm.name, receiver.uri, disks=["vdb"], level="incremental")
            assert again.manifest.disk("vdb").parent == first.manifest.backup_id  # type: ignore[union-attr]
            out = vm.workdir / "out.raw"
            for manifest, ref in ((first.manifest, refs), (again.manifest, later)):
                api.restore(vm.name, receiver.uri, "vdb", str(out), backup_id=manifest.backup_id)
                assert same_bytes(out, ref["vdb"]), manifest.backup_id
                out.unlink()
            assert api.verify(receiver.uri).ok
        finally:
            receiver.stop()
