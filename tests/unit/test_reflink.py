"""Reflink clones, FIEMAP and changed ranges: rules on synthetic extent maps, then real XFS.

The real tests run on the lab's reflink XFS (``tools/lab.sh up`` mounts it) and
are marked ``lab``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import reflink
from libvirt_rdm_backup.storage.reflink import (
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNKNOWN,
    FIEMAP_EXTENT_UNWRITTEN,
    changed_between,
    file_extents,
    reflink_clone,
    supports_reflink,
)
from tools.labkit import is_root, rdmb_reflink_tmpdir

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB


# -- the comparison rules, on synthetic extent maps ---------------------------------


def _changed(monkeypatch: pytest.MonkeyPatch, older: list[reflink.FileExtent],
             newer: list[reflink.FileExtent], start: int, length: int) -> list[tuple[int, int]]:
    maps = {"old": older, "new": newer}
    monkeypatch.setattr(reflink, "file_extents", lambda path, *_a, **_k: maps[path])
    return changed_between("old", "new", start, length)


def test_same_physical_blocks_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    same = [(0, 1000 * BLOCK, 64 * BLOCK, 0)]
    assert _changed(monkeypatch, same, same, 0, 64 * BLOCK) == []


def test_holes_in_both_and_zero_extents_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    older = [(4 * BLOCK, 500 * BLOCK, 2 * BLOCK, FIEMAP_EXTENT_UNWRITTEN)]
    assert _changed(monkeypatch, older, [], 0, 16 * BLOCK) == []
    assert _changed(monkeypatch, [], [], 0, 16 * BLOCK) == []


def test_split_extents_compare_by_position(monkeypatch: pytest.MonkeyPatch) -> None:
    # one extent in the older clone, the same blocks as two extents in the newer one,
    # except block 5 which moved
    older = [(0, 100 * BLOCK, 10 * BLOCK, 0)]
    newer = [
        (0, 100 * BLOCK, 5 * BLOCK, 0),
        (5 * BLOCK, 900 * BLOCK, BLOCK, 0),
        (6 * BLOCK, 106 * BLOCK, 4 * BLOCK, 0),
    ]
    assert _changed(monkeypatch, older, newer, 0, 10 * BLOCK) == [(5 * BLOCK, BLOCK)]


def test_unreliable_extents_count_as_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC, reflink.FIEMAP_EXTENT_ENCODED,
                 reflink.FIEMAP_EXTENT_NOT_ALIGNED, reflink.FIEMAP_EXTENT_DATA_INLINE):
        extent = [(0, 100 * BLOCK, 2 * BLOCK, flag)]
        assert _changed(monkeypatch, extent, extent, 0, 2 * BLOCK) == [(0, 2 * BLOCK)]


def test_data_against_hole_is_changed_and_results_are_relative_and_merged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    older = [(0, 100 * BLOCK, 4 * BLOCK, 0)]
    newer = [(0, 100 * BLOCK, 2 * BLOCK, 0), (2 * BLOCK, 300 * BLOCK, 6 * BLOCK, 0)]
    # blocks 2..3 moved, 4..7 are new data over a hole: one merged range
    assert _changed(monkeypatch, older, newer, 0, 8 * BLOCK) == [(2 * BLOCK, 6 * BLOCK)]
    # the same seen from an unaligned start inside block 1, clipped at block 6
    start = BLOCK + 100
    assert _changed(monkeypatch, older, newer, start, 5 * BLOCK) == [
        (2 * BLOCK - start, 6 * BLOCK + 100 - 2 * BLOCK)
    ]


# -- real files on the lab's reflink XFS --------------------------------------------


@pytest.fixture
def xfs_dir() -> Iterator[Path]:
    if not is_root():
        pytest.skip("needs root (the lab's reflink XFS)")
    with rdmb_reflink_tmpdir() as path:
        yield path


def _write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        out.truncate(size)
    return path


def _blocks(offset: int, length: int) -> tuple[int, int]:
    """``(offset, length)`` widened to whole filesystem blocks."""
    start = offset // BLOCK * BLOCK
    end = -(-(offset + length) // BLOCK) * BLOCK
    return start, end - start


@pytest.mark.lab
def test_supports_reflink(xfs_dir: Path) -> None:
    assert supports_reflink(str(xfs_dir))
    assert supports_reflink(str(_sparse(xfs_dir / "f.img", MiB)))
    assert sorted(os.listdir(xfs_dir)) == ["f.img"]  # the probe left nothing behind
    with tempfile.TemporaryDirectory(prefix="rdmb-", dir="/dev/shm") as shm:
        assert not supports_reflink(shm)


@pytest.mark.lab
def test_clone_shares_extents_and_holds_unsynced_writes(xfs_dir: Path) -> None:
    src = _sparse(xfs_dir / "src.img", 16 * MiB)
    _write(src, MiB, os.urandom(3 * MiB))
    # not yet written back: the data sits in delayed allocations of the page cache
    assert all(e[3] & FIEMAP_EXTENT_DELALLOC for e in file_extents(str(src), sync=False))
    dst = xfs_dir / "dst.img"
    reflink_clone(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    extents = file_extents(str(dst))
    assert [(e[0], e[2]) for e in extents] == [(MiB, 3 * MiB)]
    assert extents[0][3] & FIEMAP_EXTENT_SHARED and extents[0][3] & FIEMAP_EXTENT_LAST
    assert [e[1] for e in file_extents(str(src))] == [extents[0][1]]

    with pytest.raises(StorageError, match="cannot create"):
        reflink_clone(str(src), str(dst))  # never overwrites


@pytest.mark.lab
def test_clone_refused_where_extents_cannot_be_shared(xfs_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="rdmb-", dir="/dev/shm") as shm:
        for src in (_sparse(Path(shm) / "src.img", MiB), _sparse(xfs_dir / "src.img", MiB)):
            _write(src, 0, b"x" * BLOCK)
            dst = Path(shm) / "dst.img"  # tmpfs: no reflink; from XFS: another filesystem
            with pytest.raises(StorageError, match=f"^filesystem of {src} cannot share extents"):
                reflink_clone(str(src), str(dst))
            assert not dst.exists()


@pytest.mark.lab
def test_fiemap_many_extents(xfs_dir: Path) -> None:
    # within the size the file had (writes past EOF get speculative preallocation,
    # which FIEMAP shows as unwritten extents in the gaps)
    path = _sparse(xfs_dir / "holes.img", 16 * MiB)
    count = 3 * reflink.BATCH + 7  # several FIEMAP rounds
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in range(count):
            os.pwrite(fd, b"d" * BLOCK, 2 * index * BLOCK)  # every other block
    finally:
        os.close(fd)
    extents = file_extents(str(path))
    assert [(e[0], e[2]) for e in extents] == [(2 * i * BLOCK, BLOCK) for i in range(count)]
    assert not any(e[3] & FIEMAP_EXTENT_UNWRITTEN for e in extents)
    assert extents[-1][3] & FIEMAP_EXTENT_LAST
    assert not any(e[3] & FIEMAP_EXTENT_LAST for e in extents[:-1])
    # a window: whole extents that overlap it
    window = file_extents(str(path), 10 * BLOCK + 1, 4 * BLOCK)
    assert [e[0] for e in window] == [10 * BLOCK, 12 * BLOCK, 14 * BLOCK]


@pytest.mark.lab
def test_changed_between_real_clones(xfs_dir: Path) -> None:
    size = 32 * MiB
    src = _sparse(xfs_dir / "disk.img", size)
    _write(src, 0, os.urandom(8 * MiB))
    _write(src, 20 * MiB, os.urandom(MiB))
    older = xfs_dir / "a.img"
    reflink_clone(str(src), str(older))

    writes = [
        (2 * MiB, 64 * KiB),  # aligned
        (3 * MiB + 100, 10),  # unaligned, inside one block
        (5 * MiB - 10, 5000),  # unaligned, across a block boundary
        (12 * MiB, 8 * KiB),  # into a hole of the older clone
        (size, 12 * KiB),  # appended beyond the old end of file
    ]
    for offset, length in writes:
        _write(src, offset, os.urandom(length))
    hole = (20 * MiB + 256 * KiB, 128 * KiB)  # a hole punched where the older clone has data
    run(["fallocate", "--punch-hole", "--offset", str(hole[0]), "--length", str(hole[1]),
         str(src)])  # fmt: skip
    newer = xfs_dir / "b.img"
    reflink_clone(str(src), str(newer))
    assert newer.read_bytes() == src.read_bytes()

    expected = sorted([_blocks(offset, length) for offset, length in writes] + [hole])
    total = size + 64 * KiB
    assert changed_between(str(older), str(newer), 0, total) == expected
    # a window [3 MiB + 100, 7 MiB): offsets relative to its start, clipped to it
    start = 3 * MiB + 100
    got = changed_between(str(older), str(newer), start, 4 * MiB - 100)
    first, second = _blocks(3 * MiB + 100, 10), _blocks(5 * MiB - 10, 5000)
    assert got == [(0, first[0] + first[1] - start), (second[0] - start, second[1])]
    # identical clones: nothing changed; holes in both (8..12 MiB) never show up
    same = xfs_dir / "c.img"
    reflink_clone(str(newer), str(same))
    assert changed_between(str(newer), str(same), 0, total) == []
    assert changed_between(str(older), str(newer), 8 * MiB, 4 * MiB) == []
