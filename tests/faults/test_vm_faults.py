"""Faults of the VM itself: QEMU killed or stopped under a backup, the VM reset between backups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api
from tests.faults.points import Points
from tests.lab.domains import assert_running, running_state, wait_for_job
from tests.oracles import unfinished_under
from tools.labkit import LabVM, MiB, dirty_bitmaps, fill, lab_vm, qemu_leftovers

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"


def qemu_pid(vm: LabVM) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text().strip())


def start_backup(vm: LabVM, repo: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(EXE), "backup", vm.name, "--target", repo, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def repo_temp_files(repo: str) -> list[str]:
    """What unfinished runs left in the repository (staging directories, temporary files)."""
    return unfinished_under(repo)


@pytest.mark.parametrize("level", ["full", "incremental"])
def test_qemu_killed_during_a_backup(level: str) -> None:
    with lab_vm(loop_size=512 * MiB, lun_size=16 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        fill(vm, 24)
        if level == "incremental":
            points.backup()
            fill(vm, 20, first=100)
        proc = start_backup(vm, repo, "--level", level, "--disk", "vdb")
        wait_for_job(vm.dom, proc)
        os.kill(qemu_pid(vm), signal.SIGKILL)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 4, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
        # the VM died with its QEMU; it starts again, and the next backup recovers:
        # bitmaps died with QEMU, so auto re-reads and stores only what changed
        assert running_state(vm.dom)[0] == libvirt.VIR_DOMAIN_SHUTOFF, running_state(vm.dom)
        vm.dom.create()
        after = points.backup()
        vdb = after.manifest.disk("vdb")
        assert vdb is not None
        if level == "full":
            assert vdb.level == "full"
        else:
            assert vdb.level == "resync" and "tracking was lost" in vdb.reason
        fill(vm, 4, first=50)
        again = points.backup(level="incremental")
        assert again.manifest.disk("vdb").parent == after.manifest.backup_id  # type: ignore[union-attr]
        assert points.restore_every_point() == 2 * len(points.refs)
        assert repo_temp_files(repo) == []
        assert qemu_leftovers(vm.dom) == []
        assert_running(vm.dom)


def test_vm_reset_between_backups_keeps_tracking() -> None:
    """A reset (the guest reboots, QEMU stays) keeps the dirty bitmaps: incrementals go on."""
    with lab_vm(loop_size=256 * MiB, lun_size=32 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        fill(vm, 10)
        first = points.backup()
        bitmaps = dirty_bitmaps(vm.dom)
        assert bitmaps
        fill(vm, 3, first=60)
        vm.dom.reset()
        fill(vm, 2, first=90)  # writes after the reboot are tracked too
        second = points.backup(level="incremental")
        vdb = second.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "incremental"
        assert vdb.parent == first.manifest.backup_id
        assert vdb.bytes_transferred <= 5 * 8 * MiB + MiB  # only what changed
        assert points.restore_every_point() == 4
        assert_running(vm.dom)


def test_qemu_stopped_before_and_during_a_backup() -> None:
    """A QEMU that stops answering (SIGSTOP): the tool gives up in one line, then recovers."""
    with lab_vm(loop_size=256 * MiB, lun_size=16 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        fill(vm, 4)
        points.backup()
        fill(vm, 16, first=30)
        # each monitor command is given up after the QMP limit, and the cleanup after the
        # first one goes unanswered tries several: the limit sets how long a run takes here.
        # Before the backup everything is unanswered; under a job the setup must still get
        # its answers, so that limit keeps a margin for a loaded host.
        stopped_env = {**os.environ, "RDM_BACKUP_QMP_TIMEOUT": "2"}
        env = {**os.environ, "RDM_BACKUP_QMP_TIMEOUT": "3"}
        pid = qemu_pid(vm)
        try:
            # stopped before the backup: its first monitor command goes unanswered
            os.kill(pid, signal.SIGSTOP)
            proc = subprocess.run([str(EXE), "backup", vm.name, "--target", repo, "--disk",
                                   "vdb"], capture_output=True, text=True, timeout=300,
                                  env=stopped_env, check=False)
            assert proc.returncode == 4, proc.stderr
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
            assert "QEMU did not answer" in proc.stderr, proc.stderr
            os.kill(pid, signal.SIGCONT)
            assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)

            # stopped under a running copy job
            started = subprocess.Popen([str(EXE), "backup", vm.name, "--target", repo,
                                        "--disk", "vdb", "--level", "full"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env)
            wait_for_job(vm.dom, started)
            os.kill(pid, signal.SIGSTOP)
            _out, err = started.communicate(timeout=300)
            assert started.returncode == 4, err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert "QEMU did not answer" in err, err
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [m.backup_id for m in api.list_backups(repo)] == list(points.refs)
        assert_running(vm.dom)

        # QEMU answers again: the next run cleans up, and nothing written was lost
        after = points.backup()
        vdb = after.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "incremental", vdb
        assert points.restore_every_point() == 2 * len(points.refs)
        assert repo_temp_files(repo) == []
        assert qemu_leftovers(vm.dom) == []
