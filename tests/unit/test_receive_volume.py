"""The received volume file: created sparse and private, grown on request, never shrunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import OperationError
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


def test_symlinked_volume_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"x")
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(OperationError, match="cannot open volume"):
        ensure_volume(str(link), 1 << 20)
    assert real.stat().st_size == 1
