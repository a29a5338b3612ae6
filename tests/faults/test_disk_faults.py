"""Faults of the disks themselves: one hot-unplugged under its backup job, a LUN resized."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine import capture
from libvirt_rdm_backup.engine.resync import resync_layer
from libvirt_rdm_backup.errors import OperationError
from tests.faults.points import Points
from tests.lab.domains import assert_running
from tests.oracles import unfinished_under
from tools.labkit import (
    LabVM,
    MiB,
    block_disk,
    dirty_bitmaps,
    fill,
    guest_write,
    lab_vm,
    loop_device,
    qemu_leftovers,
    qmp,
)

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=600)


@contextmanager
def scsi_disk(vm: LabVM, size: int) -> Iterator[tuple[str, str]]:
    """A loop LUN hot-plugged as ``sdb`` on the virtio-scsi bus (unplugged at once, no guest
    help needed); yields its device and its disk XML, and unplugs it afterwards."""
    backing = vm.workdir / "scsi-lun.img"
    with open(backing, "wb") as stream:
        stream.truncate(size)
    with loop_device(backing) as device:
        xml = block_disk("sdb", device, bus="scsi").xml
        vm.dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        try:
            yield device, xml
        finally:
            if "dev='sdb'" in vm.dom.XMLDesc(0):
                vm.dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def nodes_on(dom: libvirt.virDomain, device: str) -> list[str]:
    """Block nodes of QEMU that have ``device`` open."""
    return [n["node-name"] for n in qmp(dom, "query-named-block-nodes",  # type: ignore[attr-defined]
                                         {"flat": True}) if n.get("file") == device]


def test_disk_unplugged_during_its_backup_job() -> None:
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm, \
            scsi_disk(vm, 64 * MiB) as (device, xml):
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo, extra={"sdb": device})
        fill(vm, 2)
        guest_write(vm.dom, "sdb", 0x51, 0, 64 * MiB)
        first = points.backup()
        sdb = first.manifest.disk("sdb")
        assert sdb is not None and sdb.data_path == "qemu"
        guest_write(vm.dom, "sdb", 0x52, 0, 64 * MiB)  # every chunk to copy again

        proc = points.start_slowed(
            "sdb", lambda: guest_write(vm.dom, "sdb", 0x52, 0, 64 * MiB))
        vm.dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 4, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "sdb was unplugged" in err, err
        assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
        assert not [p for p in Path(repo, vm.uuid).iterdir() if p.name.startswith(".partial")]
        assert qemu_leftovers(vm.dom) == []
        assert nodes_on(vm.dom, device) == []  # QEMU let go of the unplugged LUN
        assert_running(vm.dom)

        # plugged in again: its tracking died with its nodes, so it is read once (resync)
        vm.dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        guest_write(vm.dom, "sdb", 0x53, 8 * MiB, 4 * MiB)
        fill(vm, 1, first=9)
        again = points.backup()
        sdb, vdb = again.manifest.disk("sdb"), again.manifest.disk("vdb")
        assert sdb is not None and sdb.level in ("resync", "full"), sdb
        assert "tracking was lost" in sdb.reason, sdb.reason
        assert vdb is not None and vdb.level == "incremental", vdb  # the others kept theirs
        assert points.restore_every_point() == 3 * len(points.refs)
        assert qemu_leftovers(vm.dom) == []
        assert_running(vm.dom)


def test_disk_unplugged_while_it_is_resynced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracking lost, the disk is read once through a fleecing export, and unplugged then."""
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm, \
            scsi_disk(vm, 32 * MiB) as (device, xml):
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo, extra={"sdb": device})
        guest_write(vm.dom, "sdb", 0x54, 0, 8 * MiB)
        points.backup(disks=["sdb"])
        vm.dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        vm.dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)  # its bitmap is gone
        guest_write(vm.dom, "sdb", 0x55, 16 * MiB, 4 * MiB)

        def unplug_first(*args: Any, **kwargs: Any) -> Any:
            vm.dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return resync_layer(*args, **kwargs)

        monkeypatch.setattr(capture, "resync_layer", unplug_first)
        with pytest.raises(OperationError, match="disk sdb was unplugged"):
            api.backup(vm.name, repo, disks=["sdb"])
        monkeypatch.undo()
        assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
        assert unfinished_under(repo) == []
        assert qemu_leftovers(vm.dom) == [] and nodes_on(vm.dom, device) == []
        assert_running(vm.dom)

        vm.dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        again = points.backup(disks=["sdb"])
        sdb = again.manifest.disk("sdb")
        assert sdb is not None and sdb.level == "resync" and "tracking was lost" in sdb.reason
        assert points.restore_every_point() == 2


def test_lun_resized_between_two_backups() -> None:
    old, grown = 32 * MiB, 48 * MiB
    with lab_vm(loop_size=old, lun_size=16 * MiB, sizelimit=False) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        fill(vm, 2)
        first = points.backup(disks=["vdb"])
        old_bitmap = first.manifest.disk("vdb").bitmap  # type: ignore[union-attr]
        assert old_bitmap in dirty_bitmaps(vm.dom)
        guest_write(vm.dom, "vdb", 0x61, 4 * MiB, MiB)

        # the LUN grows on the storage side, then QEMU is told (as an admin would)
        with open(vm.loop_file, "r+b") as stream:
            stream.truncate(os.path.getsize(vm.loop_file) + grown - old)
        subprocess.run(["losetup", "-c", vm.loop], check=True)
        subprocess.run(["virsh", "blockresize", vm.name, "vdb", f"{grown}B"], check=True,
                       capture_output=True)
        guest_write(vm.dom, "vdb", 0x62, old, 8 * MiB)  # into the new space

        resized = f"vdb was resized from {old} to {grown} bytes"
        for level in ("incremental", "resync"):
            proc = cli("backup", vm.name, "--target", repo, "--disk", "vdb", "--level", level,
                       "--json")
            assert proc.returncode == 4, proc.stderr
            assert proc.stderr.count("\n") == 1 and resized in proc.stderr, proc.stderr
            assert proc.stdout == ""
            assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
        assert old_bitmap in dirty_bitmaps(vm.dom)  # refused runs change no tracking

        refs = points.reference("grown")
        proc = cli("backup", vm.name, "--target", repo, "--disk", "vdb", "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        (vdb,) = report["disks"]
        assert vdb["level"] == "full" and vdb["size"] == grown, vdb
        assert resized in vdb["reason"] and resized in report["reason"], report["reason"]
        points.keep(report["backup_id"], refs)
        text = cli("list", vm.name, "--target", repo)
        assert text.returncode == 0 and report["backup_id"] in text.stdout
        assert old_bitmap not in dirty_bitmaps(vm.dom)  # the old tracking is dropped

        # tracking goes on at the new size
        guest_write(vm.dom, "vdb", 0x63, old + 4 * MiB, MiB)
        after = points.backup(disks=["vdb"], level="incremental")
        assert after.manifest.disk("vdb").parent == report["backup_id"]  # type: ignore[union-attr]
        # the old point restores at the old size, the later ones at the new size
        assert points.restore_every_point() == 3
        out = vm.workdir / "old.raw"
        api.restore(vm.name, repo, "vdb", str(out), backup_id=first.manifest.backup_id)
        assert out.stat().st_size == old
        assert_running(vm.dom)
