"""A new file appears whole or not at all; what a killed writer left is removed next time."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup.fileutil import (
    HOST_TAG,
    new_file_whole,
    remove_stale_partials,
    write_atomic,
)
from libvirt_rdm_backup.repository.store import Repository
from tests.oracles import is_unfinished, unfinished_under


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


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def partial_name(name: str, pid: int, host: str = HOST_TAG, token: str = "a1b2c3") -> str:
    return f".{name}.{pid}@{host}.{token}.partial"


def test_partials_of_dead_writers_go_and_others_stay(tmp_path: Path) -> None:
    dead = dead_pid()
    stale = partial_name("disk.img", dead)
    live = partial_name("disk.img", os.getpid(), token="d4e5f6")
    other_host = partial_name("disk.img", dead, host="0badf00d")
    other_name = partial_name("disk.img.bak", dead)
    longer = partial_name("disk", dead)  # of "disk", not of "disk.img"
    for name in (stale, live, other_host, other_name, longer):
        (tmp_path / name).write_bytes(b"half")
    with new_file_whole(str(tmp_path / "disk.img")) as partial:
        assert Path(partial).name.startswith(f".disk.img.{os.getpid()}@{HOST_TAG}.")
        Path(partial).write_bytes(b"whole")
    assert names(tmp_path) == sorted([live, other_host, other_name, longer, "disk.img"])
    assert remove_stale_partials(str(tmp_path), "disk") == [str(tmp_path / longer)]


def test_a_temporary_file_replaced_under_the_writer_is_not_published(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    with pytest.raises(OSError, match="replaced"), new_file_whole(str(target)) as partial:
        Path(partial).unlink()
        Path(partial).write_bytes(b"someone else's")
    assert names(tmp_path) == []


def test_long_names_get_a_short_partial_name(tmp_path: Path) -> None:
    target = tmp_path / ("d" * 250)
    with new_file_whole(str(target)) as partial:
        assert len(Path(partial).name) < 255
        Path(partial).write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and names(tmp_path) == [target.name]


def test_what_the_tool_writes_unfinished_is_found_by_one_helper(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The names the writers really give their temporary files and staging directories are
    the ones :func:`unfinished_under` finds (the fault tests look for leftovers with it)."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    with repo.staging("0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f", "20260101T000000Z-abcdef") as st, \
            new_file_whole(str(tmp_path / "disk.img")) as partial:
        Path(st.path, "vdb.qcow2").write_bytes(b"x")
        seen: list[str] = []

        def keep_tmp(src: str, _dst: str) -> None:
            seen.append(src)
            raise OSError("stop here")

        monkeypatch.setattr(os, "replace", keep_tmp)
        monkeypatch.setattr(os, "unlink", lambda _path: None)  # left as by a killed writer
        with pytest.raises(OSError, match="stop here"):
            write_atomic(str(tmp_path / "manifest.json"), b"{}")
        monkeypatch.undo()
        assert unfinished_under(str(tmp_path)) == sorted([st.path, partial, *seen])
        assert not is_unfinished("manifest.json") and not is_unfinished("disk.img")
