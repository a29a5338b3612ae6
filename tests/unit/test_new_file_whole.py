"""A new file appears whole or not at all; what a killed writer left is removed next time."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from libvirt_rdm_backup.fileutil import new_file_whole, remove_stale_partials


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_written_data_appears_under_the_name_only_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    with new_file_whole(str(target)) as partial:
        assert not target.exists()
        assert Path(partial).parent == tmp_path and Path(partial).name.startswith(".disk.img.")
        Path(partial).write_bytes(b"x" * 4096)
    assert target.read_bytes() == b"x" * 4096
    assert names(tmp_path) == ["disk.img"]
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    with pytest.raises(RuntimeError), new_file_whole(str(target)) as partial:
        Path(partial).write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert names(tmp_path) == []


def test_a_file_that_appeared_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    with pytest.raises(FileExistsError), new_file_whole(str(target)) as partial:
        Path(partial).write_bytes(b"ours")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert names(tmp_path) == ["disk.img"]


def test_partials_of_killed_writers_go_and_live_ones_stay(tmp_path: Path) -> None:
    stale = tmp_path / ".disk.img.aaaaaa.partial"
    live = tmp_path / ".disk.img.bbbbbb.partial"
    other = tmp_path / ".other.img.cccccc.partial"
    for path in (stale, live, other):
        path.write_bytes(b"half")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
        with new_file_whole(str(tmp_path / "disk.img")) as partial:
            Path(partial).write_bytes(b"whole")
        assert names(tmp_path) == sorted([live.name, other.name, "disk.img"])
    finally:
        os.close(fd)
    assert remove_stale_partials(str(tmp_path), "disk.img") == [str(live)]
    assert names(tmp_path) == sorted([other.name, "disk.img"])
