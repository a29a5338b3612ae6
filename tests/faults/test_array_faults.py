"""The iSCSI array (tgtd) stopped in the middle of a LUN copy and brought back.

The array is a tgtd of this test's own (its own portal port and control port), so
stopping it touches no other test's LUNs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api
from tools import labkit
from tools.labkit import MiB, free_port, loop_device, rdmb_tmpdir, same_bytes, unique_name

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"
LUN_SIZE = 512 * MiB


def free_control_port() -> int:
    for port in range(4000, 5000):
        if not Path(f"/var/run/tgtd/socket.{port}").exists():
            return port
    raise RuntimeError("no free tgtd control port")


@dataclass
class PrivateArray:
    """A tgtd serving one LUN on 127.0.0.1:<port>; it can be stopped and brought back."""

    backing: Path
    iqn: str
    port: int
    control: int
    proc: subprocess.Popen[bytes] | None = None

    def tgtadm(self, *args: str) -> None:
        subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                       check=True, capture_output=True, timeout=30)

    def start(self) -> None:
        """Start tgtd and present the LUN again (what an array does when it comes back)."""
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.tgtadm("--op", "show", "--mode", "target")
                break
            except subprocess.CalledProcessError:
                assert time.monotonic() < deadline, "tgtd did not come up"
                time.sleep(0.1)
        self.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", self.iqn)
        self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                    "-b", str(self.backing))
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")

    def stop(self) -> None:
        """Kill tgtd outright (an array losing power), by its pid."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/1"


@contextmanager
def private_array(backing: Path) -> Iterator[PrivateArray]:
    array = PrivateArray(backing, f"iqn.2026-11.org.rdmb:{unique_name('array')}",
                         free_port(), free_control_port())
    array.start()
    try:
        yield array
    finally:
        array.stop()


def fill_lun(path: Path) -> None:
    """Distinct non-zero data in most of the LUN, written before the array presents it."""
    argv = ["qemu-io", "-f", "raw"]
    for index in range(0, LUN_SIZE // (32 * MiB)):
        argv += ["-c", f"write -P {0x30 + index} {index * 32 * MiB} {24 * MiB}"]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def wait_until_copying(dom: libvirt.virDomain, proc: subprocess.Popen[str], device: str) -> None:
    """A LUN is copied from storage while the guest is held: wait for that pause; a
    virtual disk is copied by a QEMU job: wait for the job."""

    def copying() -> bool:
        if device == "lun":
            return bool(dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED)
        return any(item.startswith("job ") for item in labkit.qemu_leftovers(dom))

    deadline = time.monotonic() + 60
    while not copying():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the LUN copy did not start"
        time.sleep(0.005)
    time.sleep(0.3)


STALL_LIMIT = 4  # seconds without I/O before the tool gives a copy up (RDM_BACKUP_STALL_TIMEOUT)
# seconds before an unanswered monitor command is given up (RDM_BACKUP_QMP_TIMEOUT; by default
# the stall limit): the cleanup after the first one tries several, each waiting this long
QMP_LIMIT = 3
BACK_AFTER = 60  # seconds the array stays down in the long outage


@pytest.mark.parametrize(("device", "outage"), [("lun", "short"), ("lun", "long"),
                                               ("disk", "long")])
def test_array_stopped_mid_copy_and_brought_back(device: str, outage: str) -> None:
    """Short: back within the copy, which carries on. Long: the copy is given up in one
    line (exit 4, guest resumed, nothing published), and the next backup works.

    ``lun``: a passthrough LUN, copied from the array while the guest is held;
    ``disk``: an iSCSI virtual disk, copied by a QEMU backup job.
    """
    with rdmb_tmpdir() as work:
        backing = work / "lun.img"
        with open(backing, "wb") as stream:
            stream.truncate(LUN_SIZE)
        fill_lun(backing)
        reference = work / "ref.raw"
        subprocess.run(["cp", "--sparse=always", str(backing), str(reference)], check=True)
        name = unique_name("rdmb-vm")
        with private_array(backing) as array, labkit.test_domain(
                name, [labkit.iscsi_disk("sda", array.iqn, 1, device=device,
                                          port=array.port)]) as dom:
            repo = str(work / "repo")
            env = {**os.environ, "RDM_BACKUP_STALL_TIMEOUT": str(STALL_LIMIT),
                   "RDM_BACKUP_QMP_TIMEOUT": str(QMP_LIMIT)}
            proc = subprocess.Popen([str(EXE), "backup", name, "--target", repo], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until_copying(dom, proc, device)
            array.stop()
            if outage == "short":
                time.sleep(1)
                array.start()
                _out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, err
                assert len(api.list_backups(repo)) == 1
            else:
                # the array comes back a minute later, or once the tool has given up:
                # QEMU's own iSCSI reconnect may hold its monitor meanwhile, and then the
                # tool gives up on the unanswered monitor command after the same limit
                back = threading.Timer(BACK_AFTER, array.start)
                back.start()
                try:
                    _out, err = proc.communicate(timeout=300)
                finally:
                    back.cancel()
                    back.join()
                    if array.proc is None:
                        array.start()
                if proc.returncode == 0 and device == "disk":
                    assert len(api.list_backups(repo)) == 1  # QEMU waited, then finished
                else:
                    assert proc.returncode == 4, err
                    # one error line; on a loaded host the job's cancel may outlast its wait,
                    # and a warning before it says that the next run removes what was left
                    lines = err.splitlines()
                    assert "Traceback" not in err and lines[-1].startswith("rdm-backup: error:")
                    assert all("next run removes" in line for line in lines[:-1]), err
                    # the monitor command given up is the job poll or the unplug check
                    assert (f"made no progress for {STALL_LIMIT} s" in err or re.search(
                        rf"did not answer query-(jobs|block) within {QMP_LIMIT} s", err)), err
                    assert api.list_backups(repo) == []
                    kept = {"rdm-backup-repository.json", ".lock", ".prune.lock"}
                    assert not [p for p in Path(repo).rglob("*")
                                if p.is_file() and p.name not in kept]
            published = len(api.list_backups(repo))
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # never left paused
            # the next backup runs normally, and every published point restores exactly
            api.backup(name, repo)
            out = work / "restored.raw"
            points = api.list_backups(repo)
            assert len(points) == published + 1
            for manifest in points:
                api.restore(name, repo, "sda", str(out), backup_id=manifest.backup_id)
                assert same_bytes(out, reference), manifest.backup_id
                out.unlink()
            assert api.verify(repo).ok
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert labkit.qemu_leftovers(dom) == []  # the next run removed what was left


def test_paused_copy_reaching_max_pause_is_cancelled() -> None:
    """The array stops answering while a passthrough LUN is copied with the guest paused:
    at ``--max-pause`` the copy is cancelled, the guest resumed, the backup fails in one
    line (exit 4), publishes nothing and loses no tracking (the block-layer disk's next
    backup is incremental); every published point restores byte for byte."""
    with rdmb_tmpdir() as work:
        backing = work / "lun.img"
        with open(backing, "wb") as stream:
            stream.truncate(LUN_SIZE)
        fill_lun(backing)
        reference = work / "ref.raw"
        subprocess.run(["cp", "--sparse=always", str(backing), str(reference)], check=True)
        vdb_file = work / "vdb.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(vdb_file), "32M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 4M", str(vdb_file)],
                       check=True, capture_output=True)
        name = unique_name("rdmb-vm")
        with private_array(backing) as array, loop_device(vdb_file) as loop, \
                labkit.test_domain(name, [
                    labkit.iscsi_disk("sda", array.iqn, 1, device="lun", port=array.port),
                    labkit.block_disk("vdb", loop)]) as dom:
            repo = str(work / "repo")
            first = api.backup(name, repo)
            vdb_ref = work / "vdb-ref.raw"
            subprocess.run(["cp", "--sparse=always", str(vdb_file), str(vdb_ref)], check=True)
            env = {**os.environ, "RDM_BACKUP_STALL_TIMEOUT": "300"}
            proc = subprocess.Popen([str(EXE), "backup", name, "--target", repo,
                                     "--max-pause", "10"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until_copying(dom, proc, "lun")
            array.stop()
            try:
                _out, err = proc.communicate(timeout=120)
            finally:
                array.start()
            assert proc.returncode == 4, err
            assert err.count("\n") == 1 and "--max-pause 10 s" in err, err
            assert "cancelled, the guest resumed" in err, err
            assert dom.state()[:2] == [libvirt.VIR_DOMAIN_RUNNING,
                                       libvirt.VIR_DOMAIN_RUNNING_UNPAUSED]
            assert [m.backup_id for m in api.list_backups(repo)] == [first.manifest.backup_id]
            assert not [p for p in Path(repo).rglob("*.partial*")]
            second = api.backup(name, repo)
            vdb = second.manifest.disk("vdb")
            assert vdb is not None and vdb.level == "incremental", vdb
            out = work / "restored.raw"
            for result in (first, second):
                for disk, ref in (("sda", reference), ("vdb", vdb_ref)):
                    api.restore(name, repo, disk, str(out),
                                backup_id=result.manifest.backup_id)
                    assert same_bytes(out, ref), (disk, result.manifest.backup_id)
                    out.unlink()
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
