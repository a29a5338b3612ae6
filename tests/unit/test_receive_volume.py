"""The received volume file: created sparse and private, grown on request, never shrunk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.targets.receive import ensure_volume


def test_created_grown_never_shrunk(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    ensure_volume(str(path), 10 << 20)
    assert path.stat().st_size == 10 << 20 and path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_blocks == 0  # sparse
    with open(path, "r+b") as stream:
        stream.write(b"keep")
    ensure_volume(str(path), 20 << 20)
    assert path.stat().st_size == 20 << 20
    ensure_volume(str(path), 5 << 20)
    assert path.stat().st_size == 20 << 20
    assert path.read_bytes()[:4] == b"keep"


def test_devices_are_left_as_they_are(tmp_path: Path) -> None:
    link = tmp_path / "by-id"
    os.symlink("/dev/null", link)  # e.g. /dev/disk/by-id/... naming a block device
    ensure_volume(str(link), 1 << 20)
    assert link.is_symlink() and Path("/dev/null").stat().st_size == 0


def test_unreachable_volume_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="cannot create volume"):
        ensure_volume(str(tmp_path / "missing" / "vol.img"), 1 << 20)


@pytest.mark.bad_input
def test_a_volume_file_is_served_by_one_receive_at_a_time(tmp_path: Path) -> None:
    volume = tmp_path / "vol.img"
    ensure_volume(str(volume), 4 << 20)
    with exclusive(str(volume), "held"):  # as a first receive serving it holds it
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "rdm-backup"), "receive", "--volume", str(volume),
             "--socket", str(tmp_path / "nbd.sock")],
            capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 4 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "already being served" in proc.stderr
    assert not (tmp_path / "nbd.sock").exists()
