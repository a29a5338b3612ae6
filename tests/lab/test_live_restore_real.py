"""``restore --live`` on the lab: the real guest runs from its backup within seconds while its
LUN is written back; its writes made meanwhile end up on the LUN, and nothing else changes.

The LUN is a loop device over a file (``vda``). The guest is backed up, shut off, and its LUN
scribbled over; then ``rdm-backup restore --live`` runs (slowed by ``--bwlimit`` so that the
copy is still under way while the guest writes known patterns at known offsets). The expected
LUN is the backup point (restored to a file by the ordinary restore) with the same writes
applied. ``RDMB_LIVE_LUN_MIB`` / ``RDMB_LIVE_DATA_MIB`` / ``RDMB_LIVE_BWLIMIT`` make the
acceptance run (4096 / 1024 / 64); the defaults keep the test short.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.live_restore import scratch_dir
from tools.guestkit import Guest, guest_vm
from tools.labkit import (
    block_disk,
    iscsi_disk,
    iscsi_target,
    loop_device,
    make_file,
    rdm_backup_argv,
    rdmb_tmpdir,
    same_bytes,
    unique_name,
)
from tools.livekit import finish_live_restore, guest_md5, start_live_restore, wait_running

pytestmark = pytest.mark.lab
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
LUN_SIZE = int(os.environ.get("RDMB_LIVE_LUN_MIB", "256")) * MiB
DATA_SIZE = int(os.environ.get("RDMB_LIVE_DATA_MIB", "96")) * MiB
BWLIMIT = os.environ.get("RDMB_LIVE_BWLIMIT", "1")  # MiB/s: the copy outlasts the guest's boot
RUNNING_WITHIN = 10.0  # seconds from the command until the guest runs on its backup


@dataclass
class LiveLab:
    guest: Guest
    work: Path
    lun: Path  # the file behind the loop device
    loop: str
    repo: str
    backup_id: str
    point: Path  # the backup point, restored to a file
    persistent: str  # the domain's persistent XML before anything
    writes: list[tuple[int, int, int]] = field(default_factory=list)

    def scribble(self, pattern: int = 0xEE) -> None:
        """Overwrite the LUN's data area, so that only a restore brings the point back."""
        with self.lun.open("r+b") as out:
            block = bytes([pattern]) * MiB
            for offset in range(0, DATA_SIZE + 8 * MiB, MiB):
                out.seek(offset)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())

    def expected(self, point: Path | None = None) -> Path:
        """The point with the guest's writes applied."""
        path = self.work / "expected.raw"
        shutil.copyfile(point or self.point, path)
        with path.open("r+b") as out:
            out.truncate(LUN_SIZE)
            for offset, length, pattern in self.writes:
                out.seek(offset)
                out.write(bytes([pattern]) * length)
        return path

    def write(self, offset: int, length: int, pattern: int) -> None:
        """A guest write to vda (O_DIRECT, synced), logged for :meth:`expected`."""
        self.guest.dd_write("/dev/vda", offset, length, pattern, direct=True)
        self.writes.append((offset, length, pattern))


@pytest.fixture(scope="module")
def live_lab() -> Iterator[LiveLab]:
    with rdmb_tmpdir() as work:
        lun = make_file(work / "lun.img", DATA_SIZE)
        with lun.open("r+b") as out:
            out.truncate(LUN_SIZE)
        with loop_device(lun) as loop, \
                guest_vm(unique_name("rdmb-live"), [block_disk("vda", loop)]) as guest:
            guest.wait_path("/sys/block/vda")
            repo = str(work / "repo")
            backup = api.backup(guest.name, repo)
            point = work / "point.raw"
            api.restore(guest.name, repo, "vda", str(point))
            guest.dom.destroy()
            persistent = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            lab = LiveLab(guest, work, lun, loop, repo, backup.manifest.backup_id, point,
                          persistent)
            try:
                yield lab
            finally:
                shutil.rmtree(scratch_dir(guest.dom.UUIDString()), ignore_errors=True)


@pytest.fixture
def shut_off(live_lab: LiveLab) -> LiveLab:
    """The domain shut off, its LUN scribbled over, no writes logged."""
    if live_lab.guest.dom.isActive():
        live_lab.guest.dom.destroy()
    live_lab.guest.close()
    live_lab.writes.clear()
    live_lab.scribble()
    return live_lab


def _start(lab: LiveLab, *extra: str, target: str | None = None,
           scratch: Path | None = None) -> subprocess.Popen[str]:
    return start_live_restore(lab.guest.name, target or lab.repo, *extra, scratch=scratch)


def _unthrottle(dom: libvirt.virDomain, disk: str = "vda") -> None:
    """Lift ``--bwlimit`` once the guest has done what needed a copy under way, so that the
    rest of the copy does not make the test wait (an admin's ``virsh blockjob --bandwidth 0``)."""
    if not os.environ.get("RDMB_LIVE_BWLIMIT"):
        dom.blockJobSetSpeed(disk, 0, 0)


def _md5(path: Path, offset: int, length: int) -> str:
    with path.open("rb") as src:
        src.seek(offset)
        return hashlib.md5(src.read(length)).hexdigest()


def _check_end(lab: LiveLab, point: Path | None = None, scratch: Path | None = None) -> None:
    """The disk runs on the LUN again, the definition is untouched, the overlays are gone and
    the LUN is the point plus the guest's writes."""
    dom = lab.guest.dom
    live = dom.XMLDesc(0)
    assert f"<source dev='{lab.loop}'" in live and "qcow2" not in live and "<mirror" not in live
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == lab.persistent
    assert dom.isPersistent()
    overlays = scratch / f"rdmb-live-{dom.UUIDString()}" if scratch \
        else Path(scratch_dir(dom.UUIDString()))
    assert not overlays.exists()
    assert dom.blockJobInfo("vda", 0) == {}
    assert same_bytes(lab.lun, lab.expected(point))


def test_live_restore_runs_the_guest_at_once_and_keeps_its_writes(shut_off: LiveLab) -> None:
    lab = shut_off
    started = time.monotonic()
    proc = _start(lab, "--bwlimit", BWLIMIT)
    try:
        wait_running(lab.guest.dom, proc, RUNNING_WITHIN)
        running = time.monotonic() - started
        lab.guest.wait_ready()
        ready = time.monotonic() - started
        # what the guest reads is the point: early data, data the copy has not reached yet
        for offset in (0, DATA_SIZE - 4 * MiB):
            assert guest_md5(lab.guest, offset, MiB) == _md5(lab.point, offset, MiB)
        assert proc.poll() is None, "the copy ended before the guest wrote: raise the data size"
        lab.write(0, 65536, 0x11)
        lab.write(DATA_SIZE // 2 + 12345 * 512, MiB, 0x22)
        lab.write(DATA_SIZE - 2 * MiB, 256 * 1024, 0x33)
        lab.write(LUN_SIZE - 65536, 65536, 0x44)
        copying_while_written = proc.poll() is None
        _unthrottle(lab.guest.dom)
        document = finish_live_restore(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"running after {running:.1f} s, guest answering after {ready:.1f} s, "
          f"tool: {document['running_after_seconds']} s, done after {document['seconds']} s")
    assert copying_while_written
    assert document["backup_id"] == lab.backup_id and document["resumed_run"] is False
    assert float(str(document["running_after_seconds"])) < RUNNING_WITHIN
    disks = document["disks"]
    assert isinstance(disks, list) and [d["disk"] for d in disks] == ["vda"]
    assert disks[0]["pivoted"] is True and disks[0]["to"] == lab.loop
    _check_end(lab)
    # the guest goes on, on the LUN, reading its own writes and the point
    assert lab.guest.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest_md5(lab.guest, 0, 65536) == hashlib.md5(b"\x11" * 65536).hexdigest()
    assert guest_md5(lab.guest, MiB, MiB) == _md5(lab.point, MiB, MiB)
    assert "I/O error" not in lab.guest.check("dmesg")


@pytest.mark.fault
def test_killed_mid_copy_the_guest_pauses_and_a_rerun_completes(shut_off: LiveLab) -> None:
    lab = shut_off
    dom = lab.guest.dom
    proc = _start(lab, "--bwlimit", "1")
    try:
        wait_running(dom, proc, RUNNING_WITHIN)
        lab.guest.wait_ready()
        lab.write(4 * MiB, MiB, 0x5A)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the tool is gone, and its storage daemon with it: the guest stays on its overlay, and a
    # read of what was not copied yet pauses it instead of failing
    assert dom.isActive() and "qcow2" in dom.XMLDesc(0)
    late = DATA_SIZE - 3 * MiB
    lab.guest.check(f"(dd if=/dev/vda bs=65536 skip={late // 65536} count=16 iflag=direct "
                    "2>/dev/null | md5sum > /run/late.tmp && mv /run/late.tmp /run/late.md5) "
                    ">/dev/null 2>&1 &")
    deadline = time.monotonic() + 60
    while dom.state() != [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]:
        assert time.monotonic() < deadline, f"not paused by the I/O error: {dom.state()}"
        time.sleep(0.2)
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == lab.persistent
    # a different backup is refused, the same command takes over
    rerun = _start(lab, "--backup", "20000101T000000Z-000000")
    _out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 2 and "unfinished live restore" in err, err
    document = finish_live_restore(_start(lab))
    assert document["resumed_run"] is True and document["backup_id"] == lab.backup_id
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    lab.guest.wait_path("/run/late.md5", 60)
    assert lab.guest.check("cat /run/late.md5").split()[0] == _md5(lab.point, late, MiB)
    lab.write(8 * MiB, 65536, 0x6B)  # on the LUN now
    _check_end(lab)


@pytest.mark.bad_input
def test_a_running_domain_is_refused(live_lab: LiveLab) -> None:
    if not live_lab.guest.dom.isActive():
        live_lab.guest.dom.create()
    proc = _start(live_lab)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "is running" in err and err.count("\n") == 1, err


def _wait_paused(dom: libvirt.virDomain, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while dom.state() != [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]:
        assert time.monotonic() < deadline, f"not paused by an I/O error: {dom.state()}"
        time.sleep(0.2)


@contextlib.contextmanager
def _small_filesystem(work: Path, size: int) -> Iterator[Path]:
    """An ext4 filesystem of ``size`` bytes on a loop device, mounted where it yields."""
    image = work / "scratch.img"
    with image.open("wb") as out:
        out.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mount = work / "scratch"
    mount.mkdir()
    with loop_device(image) as device:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            mount.chmod(0o755)
            yield mount
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.fault
def test_full_scratch_space_pauses_the_guest_and_loses_nothing(shut_off: LiveLab) -> None:
    lab = shut_off
    dom = lab.guest.dom
    with _small_filesystem(lab.work, 64 * MiB) as mount:
        ballast = mount / "ballast"  # leaves about 8 MiB for the overlay
        free = shutil.disk_usage(mount).free
        subprocess.run(["fallocate", "-l", str(free - 8 * MiB), str(ballast)], check=True)
        proc = _start(lab, "--bwlimit", "2", scratch=mount)
        try:
            wait_running(dom, proc, RUNNING_WITHIN)
            lab.guest.wait_ready()
            big, offset = 48 * MiB, 64 * MiB
            lab.guest.check(f"(tr '\\000' '\\167' </dev/zero | head -c {big} | dd of=/dev/vda "
                            f"bs=65536 seek={offset} iflag=fullblock oflag=seek_bytes,direct "
                            "conv=notrunc,fsync 2>/dev/null; echo $? > /run/big.done) "
                            ">/dev/null 2>&1 &")
            lab.writes.append((offset, big, 0x77))
            _wait_paused(dom)  # the overlay's filesystem is full: the guest waits, unharmed
            assert dom.diskErrors().get("vda") == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE
            assert proc.poll() is None  # the tool goes on following the copy
            ballast.unlink()  # space again, and the guest goes on
            dom.resume()
            _unthrottle(dom)
            document = finish_live_restore(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert document["resumed_run"] is False
        lab.guest.wait_path("/run/big.done", 120)
        assert lab.guest.check("cat /run/big.done").strip() == "0"
        _check_end(lab, scratch=mount)


@pytest.mark.fault
def test_backup_server_gone_mid_copy_then_back(shut_off: LiveLab) -> None:
    from tests.lab.volume_server import VolumeServer

    lab = shut_off
    dom = lab.guest.dom
    server = VolumeServer(lab.work / "volume.img", size=1 << 30)
    server.start()
    try:
        api.backup(lab.guest.name, server.uri)  # the shut-off domain: its scribbled LUN
        point = lab.work / "volume-point.raw"
        point.unlink(missing_ok=True)
        api.restore(lab.guest.name, server.uri, "vda", str(point))
        lab.scribble(0xDD)
        proc = _start(lab, "--bwlimit", "1", target=server.uri)
        try:
            wait_running(dom, proc, RUNNING_WITHIN)
            lab.guest.wait_ready()
            lab.write(2 * MiB, MiB, 0x3C)
            server.stop(signal.SIGKILL)
            # wake the throttled copy from its rate-limit sleep: its next read finds the
            # server gone (the job may have failed already)
            with contextlib.suppress(libvirt.libvirtError):
                _unthrottle(dom)
            _out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 4 and "rerun the same restore --live" in err, err
        assert err.strip().splitlines()[-1].startswith("rdm-backup: error:")
        late = DATA_SIZE - 3 * MiB
        lab.guest.check(f"(dd if=/dev/vda bs=65536 skip={late // 65536} count=16 iflag=direct "
                        "2>/dev/null | md5sum > /run/late2.tmp && mv /run/late2.tmp "
                        "/run/late2.md5) >/dev/null 2>&1 &")
        _wait_paused(dom)
        server.start()
        document = finish_live_restore(_start(lab, target=server.uri))
        assert document["resumed_run"] is True
        lab.guest.wait_path("/run/late2.md5", 60)
        assert lab.guest.check("cat /run/late2.md5").split()[0] == _md5(point, late, MiB)
        _check_end(lab, point)
    finally:
        server.stop()


def test_live_restore_of_an_iscsi_lun() -> None:
    """An iSCSI LUN of QEMU's own initiator (``<disk type='network'>``) is copied back over
    iSCSI and the disk pivots onto it."""
    with rdmb_tmpdir() as work:
        backing = make_file(work / "iscsi.img", 24 * MiB)
        with backing.open("r+b") as out:
            out.truncate(64 * MiB)
        with iscsi_target(backing) as lun, guest_vm(
                unique_name("rdmb-live"), [iscsi_disk("sda", lun.iqn, lun.lun, device="disk")]
        ) as guest:
            guest.wait_path("/sys/block/sda")
            repo = str(work / "repo")
            api.backup(guest.name, repo)
            point = work / "point.raw"
            api.restore(guest.name, repo, "sda", str(point))
            guest.dom.destroy()
            guest.close()
            persistent = guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            with backing.open("r+b") as out:
                out.write(b"\xee" * 16 * MiB)
                os.fsync(out.fileno())
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            proc = subprocess.run(
                [*rdm_backup_argv(), "restore", guest.name, "--target", repo, "--live",
                 "--disk", "sda", "--json"], capture_output=True, text=True, env=env,
                timeout=600, check=False)
            assert proc.returncode == 0, proc.stderr
            document = json.loads(proc.stdout)
            assert document["disks"][0]["to"] == lun.url
            live = guest.dom.XMLDesc(0)
            assert "protocol='iscsi'" in live and "qcow2" not in live
            assert guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == persistent
            guest.wait_ready()
            answer = guest.check("dd if=/dev/sda bs=65536 count=16 iflag=direct 2>/dev/null "
                                 "| md5sum")
            assert answer.split()[0] == _md5(point, 0, MiB)
            assert same_bytes(backing, point)
