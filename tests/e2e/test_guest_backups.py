"""Backups of a real running Linux guest: LUN I/O never fails, points in time, quiesce.

One tiny guest (tools/guestkit.py) with a block-layer disk ``vda``, a small disk ``vdb``
holding an ext4 filesystem for fsfreeze, a SCSI passthrough LUN ``sda`` on snapshot-capable
storage (tgt over a reflink file) and a LUN ``sdb`` on plain storage (copied while paused).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api, consistency, window_record
from libvirt_rdm_backup.errors import RdmBackupError
from tools.guestkit import Guest, guest_vm
from tools.labkit import (
    IscsiLun,
    block_disk,
    iscsi_disk,
    iscsi_target,
    loop_device,
    rdm_backup,
    rdmb_reflink_tmpdir,
    rdmb_tmpdir,
    same_bytes,
    unique_name,
)

pytestmark = pytest.mark.lab
MiB = 1 << 20


@dataclass
class GuestLab:
    guest: Guest
    work: Path
    vda: str
    sda: IscsiLun
    sdb: IscsiLun

    def references(self, tag: str) -> dict[str, Path]:
        """Raw copies of the raw disks now (the caller holds the guest still)."""
        refs = {disk: self.work / f"ref-{tag}-{disk}.raw" for disk in ("vda", "sda", "sdb")}
        subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", self.vda,
                        str(refs["vda"])], check=True)
        for disk, lun in (("sda", self.sda), ("sdb", self.sdb)):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", lun.url,
                            str(refs[disk])], check=True)
        return refs


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as stream:
        stream.truncate(size)
    return path


@pytest.fixture(scope="module")
def lab() -> Iterator[GuestLab]:
    with ExitStack() as stack:
        work = stack.enter_context(rdmb_tmpdir())
        snapdir = stack.enter_context(rdmb_reflink_tmpdir())
        vda = stack.enter_context(loop_device(_sparse(work / "vda.img", 128 * MiB)))
        vdb = stack.enter_context(loop_device(_sparse(work / "vdb.img", 32 * MiB)))
        sda = stack.enter_context(iscsi_target(_sparse(snapdir / "sda.img", 128 * MiB)))
        sdb = stack.enter_context(iscsi_target(_sparse(work / "sdb.img", 128 * MiB)))
        disks = [block_disk("vda", vda), block_disk("vdb", vdb),
                 iscsi_disk("sda", sda.iqn, sda.lun, device="lun"),
                 iscsi_disk("sdb", sdb.iqn, sdb.lun, device="lun")]
        guest = stack.enter_context(guest_vm(unique_name("rdmb-gbk"), disks))
        for dev in ("vda", "vdb", "sda", "sdb"):
            guest.wait_path(f"/sys/block/{dev}")
        guest.check("mke2fs -t ext4 -q /dev/vdb >/dev/null 2>&1 || mke2fs /dev/vdb >/dev/null; "
                    "mkdir -p /mnt/fs && mount /dev/vdb /mnt/fs && echo ok > /mnt/fs/a && sync")
        yield GuestLab(guest, work, vda, sda, sdb)


WRITER = ("i=0; while [ ! -e /run/stop ]; do "
          "dd if=/dev/urandom of=/dev/sda bs=65536 count=4 seek=$((512 + i % 256)) "
          "oflag=direct conv=notrunc 2>>/run/dd.err || echo w$i >> /run/errors; "
          "dd if=/dev/sda of=/dev/null bs=65536 count=4 skip=$((i % 1024)) iflag=direct "
          "2>>/run/dd.err || echo r$i >> /run/errors; "
          "i=$((i+1)); echo $i > /run/count; done")


def _count(guest: Guest) -> int:
    rc, out = guest.run("cat /run/count 2>/dev/null || echo 0")
    return int(out.strip() or 0)


def test_lun_io_never_fails_during_backups(lab: GuestLab) -> None:
    g = lab.guest
    g.check("rm -f /run/stop /run/errors /run/count; dmesg -c >/dev/null")
    g.check(f"({WRITER}) >/dev/null 2>&1 &")
    repo = str(lab.work / "repo-io")
    try:
        g.wait_path("/run/count", 20)  # the writer is under way
        before = _count(g)
        full = api.backup(g.name, repo)
        middle = _count(g)
        inc = api.backup(g.name, repo)
        time.sleep(1)
        after = _count(g)
    finally:
        g.check("touch /run/stop; sleep 1")
    assert before < middle < after, (before, middle, after)  # the guest kept writing
    assert g.run("cat /run/errors")[0] != 0, g.run("cat /run/errors /run/dd.err")[1]
    kernel = g.check("dmesg")
    assert "I/O error" not in kernel and "Aborted Command" not in kernel, kernel[-2000:]
    sda = inc.manifest.disk("sda")
    assert sda is not None and sda.data_path == "snapshot" and sda.level == "incremental"
    assert full.manifest.disk("sda").data_path == "snapshot"  # type: ignore[union-attr]
    assert full.manifest.consistency["paused_ms"] > 0  # how short it is: `make bench` (lun)


def _writes_after_point(g: Guest, pattern: int) -> Callable[[str, int, int], None]:
    """A progress callback: once the point is fixed, the guest writes what must not be in it."""
    done: list[int] = []

    def write(_job: str, _done: int, _total: int) -> None:
        if not done:
            done.append(1)
            for dev in ("vda", "sda", "sdb"):
                g.dd_write(f"/dev/{dev}", 20 * MiB, MiB, pattern, direct=True)

    return write


def test_points_in_time_with_guest_writes(lab: GuestLab) -> None:
    g = lab.guest
    repo = str(lab.work / "repo-pit")
    for dev, pattern in (("vda", 0x11), ("sda", 0x22), ("sdb", 0x33)):
        g.dd_write(f"/dev/{dev}", 4 * MiB, 2 * MiB, pattern, direct=True)
    results = []
    for round_, level in enumerate(("full", "incremental")):
        lab.guest.dom.suspend()
        try:
            refs = lab.references(f"pit{round_}")
        finally:
            lab.guest.dom.resume()
        result = api.backup(g.name, repo, level=level,
                            progress=_writes_after_point(g, 0x70 + round_))
        results.append((result, refs))
        for dev, pattern in (("vda", 0x44), ("sda", 0x55), ("sdb", 0x66)):
            g.dd_write(f"/dev/{dev}", (40 + round_) * MiB, MiB, pattern + round_, direct=True)
    assert results[1][0].manifest.disk("vda").level == "incremental"  # type: ignore[union-attr]
    assert results[1][0].manifest.disk("sda").level == "incremental"  # type: ignore[union-attr]
    assert results[1][0].manifest.disk("sdb").level == "full"  # type: ignore[union-attr]
    for result, refs in results:
        for disk, ref in refs.items():
            out = lab.work / f"out-{disk}.raw"
            api.restore(g.name, repo, disk, str(out), backup_id=result.manifest.backup_id)
            assert same_bytes(out, ref), f"{disk} of {result.manifest.level}"
            out.unlink()


def test_quiesce_freezes_and_thaws(lab: GuestLab) -> None:
    g = lab.guest
    g.wait_agent(30)
    result = api.backup(g.name, str(lab.work / "repo-q"), quiesce="required")
    consistency = result.manifest.consistency
    assert consistency["method"].startswith("fsfreeze"), consistency
    assert consistency["frozen_filesystems"] >= 1
    assert g.agent("guest-fsfreeze-status") == "thawed"
    g.check("echo after > /mnt/fs/after && sync")


@pytest.mark.fault
def test_thaw_and_resume_when_the_tool_is_interrupted(lab: GuestLab) -> None:
    g = lab.guest
    g.wait_agent(30)
    # sdb (plain storage) is copied with the guest frozen and paused: a long window
    g.dd_write("/dev/sdb", 0, 96 * MiB, 0x5A, direct=True)
    repo = str(lab.work / "repo-int")
    exe = Path(sys.executable).parent / "rdm-backup"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([str(exe), "backup", g.name, "--target", repo, "--quiesce",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while g.dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(sig)
        killed = time.monotonic()
        if sig == signal.SIGTERM:  # cleaned up by the tool itself
            out, err = proc.communicate()
            assert proc.returncode == 4 and "interrupted" in err
            assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert g.agent("guest-fsfreeze-status") == "thawed"
    # after SIGKILL the tool's watchdog resumes and thaws the guest within seconds
    assert _running_again(g, killed + 5.0) == (libvirt.VIR_DOMAIN_RUNNING,
                                               libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
    assert _freeze_status(g, killed + 5.0) == "thawed"
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and "resumed the guest" in err, err
    api.backup(g.name, repo, disks=["vda"])
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert g.agent("guest-fsfreeze-status") == "thawed"
    assert api.list_backups(repo)[-1].disks[0].disk.target == "vda"


def _running_again(g: Guest, deadline: float) -> tuple[int, int]:
    """The domain's state and reason once it runs, or as it is at ``deadline``."""
    state = g.dom.state()
    while state[0] != libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
        state = g.dom.state()
    return state[0], state[1]


def _freeze_status(g: Guest, deadline: float) -> object:
    """``guest-fsfreeze-status`` once it says thawed, or the last answer at ``deadline``."""
    status: object = None
    while True:
        try:
            status = g.agent("guest-fsfreeze-status", timeout=2)
        except libvirt.libvirtError as err:
            status = str(err)
        if status == "thawed" or time.monotonic() >= deadline:
            return status
        time.sleep(0.2)


@pytest.mark.fault
def test_agent_hangs_after_fsfreeze_and_the_thaw_fails(lab: GuestLab,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-ga stops answering between a successful freeze and the thaw: the window gives up
    the thaw within its limit and fails in one line (exit 4), the guest keeps running, and
    the watchdog thaws it once the agent answers again; the next backup restores exactly."""
    g = lab.guest
    g.wait_agent(30)
    monkeypatch.setenv("RDM_BACKUP_AGENT_TIMEOUT", "3")  # this process's and the watchdog's
    monkeypatch.setenv("RDM_BACKUP_WATCHDOG_LINGER", "300")
    marker = Path(window_record.marker_dir()) / f"{g.dom.UUIDString()}.json"
    stopped = False
    try:
        with pytest.raises(RdmBackupError) as failed:  # noqa: PT012 - the window's body
            with consistency.consistency_window(g.dom, quiesce="required") as window:
                assert window.method == "fsfreeze"
                assert g.agent("guest-fsfreeze-status") == "frozen"
                g.check("killall -STOP qemu-ga")  # the guest runs: its shell answers
                stopped = True
        message = str(failed.value)
        assert failed.value.exit_code == 4 and "\n" not in message
        assert "cannot thaw" in message and "watchdog" in message, message
        assert g.dom.state()[:2] == [libvirt.VIR_DOMAIN_RUNNING,
                                     libvirt.VIR_DOMAIN_RUNNING_UNPAUSED]
        assert marker.exists()  # kept for the watchdog (and the next run)
    finally:
        if stopped:
            g.check("killall -CONT qemu-ga")
    g.wait_agent(60)
    assert _freeze_status(g, time.monotonic() + 60) == "thawed"
    deadline = time.monotonic() + 30
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marker.exists()
    g.check("echo after > /mnt/fs/after-thaw && sync")
    g.dom.suspend()
    try:
        ref = lab.work / "ref-thaw-vda.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", lab.vda,
                        str(ref)], check=True)
    finally:
        g.dom.resume()
    repo = str(lab.work / "repo-thaw")
    result = api.backup(g.name, repo, disks=["vda"], quiesce="required")
    assert result.manifest.consistency["method"].startswith("fsfreeze")
    out_file = lab.work / "out-thaw-vda.raw"
    api.restore(g.name, repo, "vda", str(out_file))
    assert same_bytes(out_file, ref)
    assert g.agent("guest-fsfreeze-status") == "thawed"


@pytest.mark.fault
def test_hung_agent(lab: GuestLab, monkeypatch: pytest.MonkeyPatch) -> None:
    g = lab.guest
    g.wait_agent(30)
    monkeypatch.setenv("RDM_BACKUP_AGENT_TIMEOUT", "3")
    g.check("killall -STOP qemu-ga")
    try:
        started = time.monotonic()
        proc = rdm_backup("backup", g.name, "--target", str(lab.work / "repo-hung"),
                          "--quiesce", "--json")
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < 60
        consistency = json.loads(proc.stdout)["consistency"]
        assert consistency["method"] == "pause"
        assert any("guest agent" in note for note in consistency["notes"])
        assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        g.check("killall -CONT qemu-ga")
    g.wait_agent(30)
    assert g.agent("guest-fsfreeze-status") == "thawed"


@pytest.mark.fault
def test_missing_agent(lab: GuestLab, monkeypatch: pytest.MonkeyPatch) -> None:
    g = lab.guest
    monkeypatch.setenv("RDM_BACKUP_AGENT_TIMEOUT", "3")
    g.check("killall qemu-ga; sleep 1")
    try:
        proc = rdm_backup("backup", g.name, "--target", str(lab.work / "repo-na"),
                          "--quiesce=required")
        assert proc.returncode == 4 and "guest agent" in proc.stderr
        assert proc.stderr.count("\n") == 1
        proc = rdm_backup("backup", g.name, "--target", str(lab.work / "repo-na"),
                          "--quiesce", "--json")
        assert proc.returncode == 0, proc.stderr
        consistency = json.loads(proc.stdout)["consistency"]
        assert consistency["method"] == "pause"
        assert any("guest agent" in note for note in consistency["notes"])
        assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        g.check("qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 "
                ">/dev/null 2>&1 &")
