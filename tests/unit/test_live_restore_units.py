"""Live restore without the lab: the live definition, copy destinations, the follow loop, the
command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest

from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain import live_xml
from libvirt_rdm_backup.engine import live_restore
from libvirt_rdm_backup.errors import OperationError, UsageError

PERSISTENT = """<domain type='kvm'>
  <name>vm1</name><uuid>6f1c2b0a-1111-4222-8333-444455556666</uuid>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/mapper/lun1'/>
      <target dev='vdb' bus='virtio'/>
      <serial>LUN1</serial>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='iscsi' name='iqn.2026-01.lab:t1/1'><host name='127.0.0.1' port='3260'/>
      </source>
      <target dev='sdc' bus='scsi'/>
    </disk>
    <disk type='network' device='lun'>
      <driver name='qemu' type='raw'/>
      <source protocol='iscsi' name='iqn.2026-01.lab:t2/1'><host name='127.0.0.1'/></source>
      <target dev='sdd' bus='scsi'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/var/lib/os.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""

CAPABILITIES = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+64055:+994</baselabel>
    <baselabel type='qemu'>+107:+107</baselabel></secmodel>
</host></capabilities>"""


def test_live_definition_switches_only_the_named_disks() -> None:
    overlay = live_xml.Overlay("vdb", "/var/tmp/rdmb-live-x/vdb.qcow2", "/var/tmp/s.sock", "vdb")
    root = live_xml.parse(live_xml.live_definition(PERSISTENT, [overlay]))
    vdb = live_xml.disk_element(root, "vdb")
    assert vdb.get("type") == "file"
    driver = vdb.find("driver")
    assert driver is not None
    assert (driver.get("type"), driver.get("error_policy"), driver.get("rerror_policy")) == \
        ("qcow2", "stop", "stop")
    assert driver.get("cache") == "none"  # the rest of the driver is kept
    assert vdb.find("source").get("file") == overlay.path  # type: ignore[union-attr]
    backing = vdb.find("backingStore")
    assert backing is not None and backing.get("type") == "network"
    assert backing.find("format").get("type") == "raw"  # type: ignore[union-attr]
    nbd = backing.find("source")
    assert nbd is not None and (nbd.get("protocol"), nbd.get("name")) == ("nbd", "vdb")
    assert nbd.find("host").get("socket") == overlay.socket  # type: ignore[union-attr]
    assert vdb.findtext("serial") == "LUN1"  # what the guest sees stays
    assert live_xml.disk_source_file(live_xml.live_definition(PERSISTENT, [overlay]), "vdb") \
        == overlay.path
    sdc = live_xml.disk_element(root, "sdc")
    assert sdc.get("type") == "network" and sdc.find("backingStore") is None


def test_copy_destination_is_the_disks_own_source_written_raw() -> None:
    root = live_xml.parse(PERSISTENT)
    block = live_xml.parse(live_xml.copy_destination(live_xml.disk_element(root, "vdb")))
    assert block.get("type") == "block"
    assert block.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert block.find("source").get("dev") == "/dev/mapper/lun1"  # type: ignore[union-attr]
    iscsi = live_xml.parse(live_xml.copy_destination(live_xml.disk_element(root, "sdc")))
    source = iscsi.find("source")
    assert iscsi.get("type") == "network" and source is not None
    assert (source.get("protocol"), source.get("name")) == ("iscsi", "iqn.2026-01.lab:t1/1")


@pytest.mark.parametrize(("disk", "words"), [
    ("sdd", "pass through"), ("vda", "not a raw disk")])
def test_disks_that_cannot_run_from_a_backup_are_refused(disk: str, words: str) -> None:
    root = live_xml.parse(PERSISTENT)
    with pytest.raises(UsageError, match=words):
        live_xml.check_restorable(live_xml.disk_element(root, disk), disk)
    with pytest.raises(UsageError, match="no disk 'vdz'"):
        live_xml.disk_element(root, "vdz")


def test_qemu_user_comes_from_the_dac_base_label() -> None:
    assert live_xml.dac_owner(CAPABILITIES, "kvm") == (64055, 994)
    assert live_xml.dac_owner(CAPABILITIES, "qemu") == (107, 107)
    assert live_xml.dac_owner(CAPABILITIES, "xen") is None


def test_scratch_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv(live_restore.SCRATCH_DIR_ENV, str(tmp_path))
    assert live_restore.scratch_dir("u-1") == str(tmp_path / "rdmb-live-u-1")


class FakeDomain:
    """A running domain whose block jobs advance by ``step`` bytes per look."""

    def __init__(self, total: int, step: int, ready_after: int = 0,
                 vanish: bool = False) -> None:
        self.jobs = {"vdb": [0, total]}
        self.step, self.ready_after, self.vanish = step, ready_after, vanish
        self.pivots: list[str] = []
        self.early_pivots = 0

    def blockJobInfo(self, disk: str, flags: int) -> dict[str, int]:  # noqa: N802
        job = self.jobs.get(disk)
        if job is None:
            return {}
        job[0] = min(job[1], job[0] + self.step)
        if self.vanish and job[0] >= job[1] // 2:
            del self.jobs[disk]
        return {"type": 2, "cur": job[0], "end": job[1], "bandwidth": 0}

    def blockJobAbort(self, disk: str, flags: int) -> None:  # noqa: N802
        assert flags == libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
        if self.ready_after > 0:
            self.ready_after -= 1
            self.early_pivots += 1
            err = libvirt.libvirtError("disk vdb not ready for pivot yet")
            err.err = (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, 0, "", 0, "", None, None, 0, 0)
            raise err
        del self.jobs[disk]
        self.pivots.append(disk)

    def state(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def diskErrors(self) -> dict[str, int]:  # noqa: N802
        return {"vdb": libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC}


def _disk() -> live_restore.LiveDisk:
    return live_restore.LiveDisk("vdb", "/dev/mapper/lun1", 1000, 1000)


def test_follow_reports_progress_and_pivots_once_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_restore, "LOOK_EVERY", 0.0)
    dom = FakeDomain(1000, 300, ready_after=2)
    seen: list[tuple[str, int, int]] = []
    disk = _disk()
    live_restore._follow(dom, [disk], lambda *a: seen.append(a))  # type: ignore[arg-type]
    assert disk.pivoted and dom.pivots == ["vdb"] and dom.early_pivots == 2
    assert [s[1] for s in seen][:4] == [300, 600, 900, 1000]
    assert all(s[0] == "vdb" and s[2] == 1000 for s in seen)


def test_a_copy_that_stops_is_an_error_that_names_the_rerun(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_restore, "LOOK_EVERY", 0.0)
    dom = FakeDomain(1000, 300, vanish=True)
    with pytest.raises(OperationError, match=r"vdb: I/O error.*rerun the same restore --live"):
        live_restore._follow(dom, [_disk()], None)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", [
    ["restore", "vm", "--target", "/x", "--disk", "vdb", "--disk", "vdc", "--to", "/y"],
    ["restore", "vm", "--target", "/x", "--live", "--to", "/y"],
    ["restore", "vm", "--target", "/x", "--live", "--force"],
    ["restore", "vm", "--target", "/x", "--live", "--bwlimit", "0"],
])
def test_live_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdm-backup: error:") and err.count("\n") == 1


def test_progress_lines_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    from libvirt_rdm_backup.cli.live import live_progress

    show = live_progress(True)
    show("vdb", 0, 100)
    show("vdb", 50, 100)  # within the report interval: not shown
    show("vdb", 100, 100)
    lines = capsys.readouterr().err.splitlines()
    import json

    docs: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert [d["copied_bytes"] for d in docs] == [0, 100]
    assert docs[-1] == {"disk": "vdb", "copied_bytes": 100, "total_bytes": 100,
                        "eta_seconds": 0}
