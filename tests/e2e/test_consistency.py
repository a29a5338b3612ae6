"""Consistency windows on the real lab: quiesce without an agent, windows left open by kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.errors import OperationError
from tools.labkit import MiB, guest_write, lab_vm, rdm_backup, same_bytes, snapshot_source

pytestmark = pytest.mark.lab


@pytest.mark.fault
def test_quiesce_without_a_guest_agent() -> None:
    with lab_vm(loop_size=64 * MiB, lun_size=16 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        guest_write(vm.dom, "vdb", 0x21, 0, MiB)
        proc = rdm_backup("backup", vm.name, "--target", repo, "--quiesce=required", "--json")
        assert proc.returncode == 4, proc.stderr
        assert "guest agent" in proc.stderr and "--quiesce=required" in proc.stderr
        assert proc.stderr.count("\n") == 1
        assert api.list_backups(repo) == []

        vm.dom.suspend()
        try:
            refs = snapshot_source(vm, vm.workdir / "ref")
        finally:
            vm.dom.resume()
        result = api.backup(vm.name, repo, quiesce="try")
        consistency = result.manifest.consistency
        assert consistency["method"] == "pause"  # crash-consistent: the vCPUs were paused
        assert any("guest agent" in note for note in consistency["notes"])
        assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        for disk, ref in refs.items():
            out = vm.workdir / f"{disk}.raw"
            api.restore(vm.name, repo, disk, str(out))
            assert same_bytes(out, ref)


def wait_running(dom: libvirt.virDomain, within: float) -> tuple[int, int]:
    """Poll the domain's state and reason until it runs again, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    state = dom.state()
    while state[0] != libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
        state = dom.state()
    return state[0], state[1]


@pytest.mark.fault
def test_a_killed_run_leaves_no_paused_guest_behind() -> None:
    # the LUN has no snapshot-capable storage (plain tgt file), so it is copied while the
    # guest is paused: kill the tool inside that window; its watchdog resumes the guest
    with lab_vm(loop_size=64 * MiB, lun_size=1024 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        for index in range(64):
            guest_write(vm.dom, "sda", 0x40 + index, index * 16 * MiB, 8 * MiB)
        exe = Path(sys.executable).parent / "rdm-backup"
        proc = subprocess.Popen([str(exe), "backup", vm.name, "--target", repo, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 60
        while vm.dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the guest was never paused"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the tool and its whole process group
        proc.wait()
        assert wait_running(vm.dom, 5.0) == (libvirt.VIR_DOMAIN_RUNNING,
                                             libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
        _out, err = proc.communicate()
        assert "resumed the guest" in err, err
        assert api.list_backups(repo) == []
        result = api.backup(vm.name, repo, disks=["vdb"])
        assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert [m.backup_id for m in api.list_backups(repo)] == [result.manifest.backup_id]


def test_a_paused_domain_stays_paused() -> None:
    with lab_vm(loop_size=64 * MiB, lun_size=16 * MiB) as vm:
        vm.dom.suspend()
        result = api.backup(vm.name, str(vm.workdir / "repo"))
        assert result.manifest.consistency["method"] == "already-paused"
        assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        with pytest.raises(OperationError, match="guest agent"):
            api.backup(vm.name, str(vm.workdir / "repo"), quiesce="required")
        time.sleep(1)  # what the watchdogs of both runs did is done by now
        assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        doc = json.loads(rdm_backup("list", "--target", str(vm.workdir / "repo"),
                                    "--json").stdout)
        assert len(doc) == 1


@pytest.mark.fault
def test_max_pause_refuses_a_paused_copy_up_front() -> None:
    # the LUN is on plain storage (no snapshots): `disks` says it needs a paused copy, and a
    # bound its measured read rate cannot meet is refused before the guest is ever paused
    with lab_vm(loop_size=64 * MiB, lun_size=1024 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        doc = json.loads(rdm_backup("disks", vm.name, "--json").stdout)
        paused = {d["target"]: d["paused_copy"] for d in doc["raw_disks"]}
        assert paused["vdb"] is None and "paused" in paused["sda"], paused
        text = rdm_backup("disks", vm.name).stdout
        assert text.count("copied while the guest is paused") == 1, text
        proc = rdm_backup("backup", vm.name, "--target", repo, "--max-pause", "0.05")
        assert proc.returncode == 4, proc.stderr
        assert proc.stderr.count("\n") == 1 and "--max-pause 0.05 s" in proc.stderr
        assert "disk sda" in proc.stderr and "nothing was paused" in proc.stderr
        # never paused: a domain resumed after a pause says so in its running reason
        assert vm.dom.state()[:2] == [libvirt.VIR_DOMAIN_RUNNING,
                                      libvirt.VIR_DOMAIN_RUNNING_BOOTED]
        assert api.list_backups(repo) == []
        bad = rdm_backup("backup", vm.name, "--target", repo, "--max-pause", "0")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        result = api.backup(vm.name, repo)  # the default bound: 30 s
        assert result.manifest.disk("sda").data_path == "storage"  # type: ignore[union-attr]
        assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
