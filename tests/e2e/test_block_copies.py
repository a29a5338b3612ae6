"""Copies from storage and restores as block jobs of a private qemu-storage-daemon: byte for
byte, at the ``--bwlimit`` speed (as the daemon and the guest's QEMU report it), and a copy
killed or hung publishes nothing and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon
from tests.lab.domains import assert_running
from tools.labkit import MiB, guest_write, lab_vm, same_bytes, snapshot_source

pytestmark = pytest.mark.lab

EXE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rdm-backup"


def fill_host_side(path: Path, offset: int, pattern: int, length: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(bytes([pattern]) * length)


@contextmanager
def daemon_speeds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The ``speed`` of every block job the copy daemons report (``query-block-jobs``) at
    each look the tool takes at its copy."""
    speeds: list[int] = []
    watch = StorageDaemon.watch_job

    def looked(self: StorageDaemon, job_id: str, timeout: float) -> dict[str, Any] | None:
        speeds.extend(int(job["speed"]) for job in self.execute("query-block-jobs"))
        return watch(self, job_id, timeout)

    monkeypatch.setattr(StorageDaemon, "watch_job", looked)
    yield speeds


def guest_job_speeds(name: str) -> list[int]:
    out = subprocess.run(["virsh", "qemu-monitor-command", name,
                          '{"execute":"query-block-jobs"}'],
                         capture_output=True, text=True, check=True).stdout
    return [int(job["speed"]) for job in json.loads(out)["return"]]


def test_lun_backup_and_restore_through_the_daemon_at_the_speed_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with lab_vm(loop_size=64 * MiB) as vm:
        guest_write(vm.dom, "vdb", 0x51, 2 * MiB, 3 * MiB)
        guest_write(vm.dom, "sda", 0x52, 5 * MiB, 2 * MiB)
        guest_write(vm.dom, "sda", 0x53, 40 * MiB, MiB)
        vm.dom.suspend()
        try:
            refs = snapshot_source(vm, vm.workdir / "ref")
        finally:
            vm.dom.resume()
        repo = str(vm.workdir / "repo")
        guest: list[int] = []

        def look(_job: str, _done: int, _total: int) -> None:
            if not guest:  # after the window: the guest's backup job of vdb runs
                guest.extend(guest_job_speeds(vm.name) or [-1])

        with daemon_speeds(monkeypatch) as speeds:
            result = api.backup(vm.name, repo, progress=look, bwlimit=48)
        records = {d.disk.target: d for d in result.manifest.disks}
        assert records["sda"].data_path == "storage" and records["vdb"].data_path == "qemu"
        assert speeds and set(speeds) == {48 * MiB}  # the LUN's copy in the daemon
        assert guest == [48 * MiB]  # the guest's own backup job
        # the zeros of the LUN took no space in its layer: about its 3 MiB of data
        assert records["sda"].bytes_transferred == 3 * MiB
        assert records["sda"].stored_bytes < 4 * MiB
        assert_running(vm.dom)

        done: list[int] = []

        def count(_job: str, now: int, _total: int) -> None:
            done.append(now)

        for disk in ("sda", "vdb"):
            out = vm.workdir / f"restored-{disk}.raw"
            done.clear()
            with daemon_speeds(monkeypatch) as speeds:
                api.restore(vm.name, repo, disk, str(out), bwlimit=16, progress=count)
            assert set(speeds) == {16 * MiB}
            assert done and done[-1] > 0 and sorted(done) == done
            assert same_bytes(out, refs[disk]), disk
            assert os.stat(out).st_blocks * 512 <= 4 * MiB  # sparse
        proc = subprocess.run([str(EXE), "restore", vm.name, "--target", repo, "--disk", "sda",
                               "--to", str(vm.workdir / "x.raw"), "--bwlimit", "0"],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "--bwlimit" in proc.stderr and not (vm.workdir / "x.raw").exists()


def daemons_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                argv0 = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"qemu-storage-daemon"):
                found.append(int(kid))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_daemon(proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 60
    while not (found := daemons_of(proc.pid)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no copy started"
        time.sleep(0.02)
    time.sleep(0.5)  # copying
    return found[0]


@pytest.mark.fault
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_copy_killed_or_hung_publishes_nothing(how: str) -> None:
    """The tool is killed (SIGKILL) mid-copy: its daemon dies with it. The daemon hangs
    (SIGSTOP): the copy is given up in one line, exit 4, and the daemon is killed. Either
    way nothing is published, and the next backup restores byte for byte."""
    with lab_vm(loop_size=64 * MiB, start=False) as vm:
        fill_host_side(vm.loop_file, 3 * MiB + 10 * MiB, 0x61, 40 * MiB)
        refs = snapshot_source(vm, vm.workdir / "ref")
        repo = str(vm.workdir / "repo")
        env = {**os.environ, "RDM_BACKUP_STALL_TIMEOUT": "3"}
        proc = subprocess.Popen([str(EXE), "backup", vm.name, "--target", repo, "--disk",
                                 "vdb", "--bwlimit", "4"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            daemon = wait_for_daemon(proc)
            if how == "killed":
                proc.kill()
                proc.wait(10)
            else:
                os.kill(daemon, signal.SIGSTOP)
                _out, err = proc.communicate(timeout=120)
                assert proc.returncode == 4, err
                assert err.count("\n") == 1 and "Traceback" not in err, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 10
        while alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(daemon), "the copy's daemon outlived the run"
        assert api.list_backups(repo) == []
        result = api.backup(vm.name, repo, disks=["vdb"])
        assert [m.backup_id for m in api.list_backups(repo)] == [result.manifest.backup_id]
        out = vm.workdir / "restored.raw"
        api.restore(vm.name, repo, "vdb", str(out))
        assert same_bytes(out, refs["vdb"])
        assert api.verify(repo).ok
