"""Faults: backups started at once, libvirtd restarted under a running backup job."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from tests.lab.domains import assert_running, wait_for_job
from tools.labkit import LabVM, MiB, fill, lab_vm, same_bytes, snapshot_source

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"
LAB = Path(__file__).resolve().parents[2] / "tools" / "lab.sh"


def start(vm: LabVM, repo: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(EXE), "backup", vm.name, "--target", repo, "--disk", "vdb",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_backups_of_one_vm_and_of_two_vms_at_once() -> None:
    with lab_vm(loop_size=1024 * MiB) as vm, lab_vm(loop_size=256 * MiB) as other:
        fill(vm, 50)
        repo = str(vm.workdir / "repo")
        first = start(vm, repo)
        wait_for_job(vm.dom, first)
        second = start(vm, str(vm.workdir / "repo2"))  # another repository, same VM
        _out, err = second.communicate(timeout=120)
        assert second.returncode == 4 and "another backup of domain" in err
        assert err.count("\n") == 1
        third = start(other, str(other.workdir / "repo"))  # another VM: both succeed
        assert third.wait(120) == 0, third.communicate()
        assert first.wait(120) == 0, first.communicate()
        assert len(api.list_backups(repo)) == 1


@pytest.mark.serial  # restarts the libvirtd every other test talks to
def test_libvirtd_restarted_during_a_backup_job() -> None:
    with lab_vm(loop_size=1024 * MiB) as vm:
        fill(vm, 50)
        repo = str(vm.workdir / "repo")
        first = api.backup(vm.name, repo, disks=["vdb"])
        fill(vm, 40)  # changes that the next backups must carry
        proc = start(vm, repo, "--level", "incremental")
        wait_for_job(vm.dom, proc)
        subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=False)
        try:
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 4, err
            assert err.count("\n") == 1 and "Traceback" not in err
        finally:
            deadline = time.monotonic() + 60
            while subprocess.run(["pgrep", "-x", "libvirtd"], check=False).returncode == 0:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            subprocess.run([str(LAB), "up"], check=True, capture_output=True, timeout=120)
        # the VM survived; the next run cleans what the interrupted one left in QEMU
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            dom = conn.lookupByUUIDString(vm.uuid)
            assert_running(dom)
            dom.suspend()
            try:
                refs = snapshot_source(vm, vm.workdir / "ref")
            finally:
                dom.resume()
            again = api.backup(vm.name, repo, disks=["vdb"], level="incremental")
            assert again.manifest.disk("vdb").parent == first.manifest.backup_id  # type: ignore[union-attr]
            out = vm.workdir / "vdb.raw"
            api.restore(vm.name, repo, "vdb", str(out))
            assert same_bytes(out, refs["vdb"])
            assert [m.backup_id for m in api.list_backups(repo)] == [
                first.manifest.backup_id, again.manifest.backup_id]
        finally:
            conn.close()
