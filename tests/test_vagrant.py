"""The Vagrant box definition is valid and provisions with the project's own lab script."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VAGRANT_DIR = REPO / "vagrant"
VAGRANTFILE = VAGRANT_DIR / "Vagrantfile"


def _vagrant() -> str:
    exe = shutil.which("vagrant")
    if exe is not None:
        return exe
    if os.geteuid() != 0:
        pytest.skip("vagrant is not installed and not root (`make install` installs it as root)")
    pytest.fail("vagrant is missing although running as root: `tools/lab.sh install` installs it")


def test_vagrantfile_validates(tmp_path: Path) -> None:
    vagrant = _vagrant()
    env = dict(
        os.environ,
        VAGRANT_CHECKPOINT_DISABLE="1",  # no network
        VAGRANT_HOME=str(tmp_path / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"),  # keep .vagrant/ out of the repo
        VAGRANT_DEFAULT_PROVIDER="libvirt",
    )
    proc = subprocess.run(
        [vagrant, "validate"],
        cwd=VAGRANT_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Vagrantfile validated successfully" in proc.stdout, output
    assert not (VAGRANT_DIR / ".vagrant").exists()


def test_vagrantfile_provisions_with_lab_script() -> None:
    text = VAGRANTFILE.read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert "config.vm.provider :libvirt" in text
    for setting in (
        "lv.memory = 4096",
        "lv.cpus = 2",
        "lv.nested = true",
        'lv.cpu_mode = "host-passthrough"',
    ):
        assert setting in text
    assert 'type: "rsync"' in text and '"/vagrant"' in text
    assert "/vagrant/tools/lab.sh install && /vagrant/tools/lab.sh up" in text
    assert "make -C /vagrant test" in text
    lab = REPO / "tools" / "lab.sh"
    assert lab.is_file() and os.access(lab, os.X_OK)
