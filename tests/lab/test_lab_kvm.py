"""The lab copes with a /dev/kvm that udev never set up (0600 root:root on a fresh machine)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tools import labkit
from tools.labkit import LAB_DOMAIN_TYPE, domain_type

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent.parent
KVM = "/dev/kvm"


@pytest.fixture
def kvm_as_without_udev() -> Iterator[os.stat_result]:
    """/dev/kvm set to 0600 root:root for the test; its mode and group are put back after."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists(KVM):
        pytest.skip("this machine has no /dev/kvm")
    before = os.stat(KVM)
    os.chown(KVM, 0, 0)
    os.chmod(KVM, 0o600)
    try:
        yield before
    finally:
        os.chown(KVM, before.st_uid, before.st_gid)
        os.chmod(KVM, stat.S_IMODE(before.st_mode))


def test_lab_up_makes_kvm_usable_by_qemu(
    kvm_as_without_udev: os.stat_result, run_token: str
) -> None:
    proc = subprocess.run([str(REPO / "tools" / "lab.sh"), "up"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    decided = Path(LAB_DOMAIN_TYPE).read_text().strip()
    st = os.stat(KVM)
    if decided == "kvm":
        # what Debian's udev rule does: group kvm, mode 0660
        import grp

        assert grp.getgrgid(st.st_gid).gr_name == "kvm"
        assert stat.S_IMODE(st.st_mode) & 0o060 == 0o060
    else:
        assert "TCG" in proc.stderr, proc.stderr
    assert domain_type() == decided
    # a domain of the decided type starts and runs
    name = f"rdmb-{run_token}-kvm"
    with labkit.test_domain(name, []) as dom:
        state, _reason = dom.state()
        assert state == libvirt.VIR_DOMAIN_RUNNING
