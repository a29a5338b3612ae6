"""Ranges copied by a backup job of a real qemu-storage-daemon: only the ranges asked (widened
to 64 KiB) change on the target, zeroes included; the rest keeps what it held."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from libvirt_rdm_backup.qemu.block_copy import Endpoint, raw_source
from libvirt_rdm_backup.qemu.ranged_copy import GRANULARITY, copy_ranges

MiB = 1 << 20
SIZE = 8 * MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="needs qemu-storage-daemon")


def test_only_the_ranges_reach_the_target(tmp_path: Path) -> None:
    source, target = tmp_path / "src.raw", tmp_path / "dst.raw"
    data = bytearray(os.urandom(SIZE))
    data[3 * MiB : 4 * MiB] = bytes(MiB)  # a range the source now reads as zero
    source.write_bytes(bytes(data))
    old = os.urandom(SIZE)
    target.write_bytes(old)
    ranges = [(0, 4096), (3 * MiB, MiB), (5 * MiB + 100, 10), (SIZE - 512, 512)]
    copy_ranges(Endpoint(raw_source(str(source))),
                Endpoint({"driver": "raw", "file": {"driver": "file", "filename": str(target)}}),
                ranges, SIZE, "vdb")
    got = target.read_bytes()
    covered = bytearray(SIZE)
    for offset, length in ranges:
        start = offset // GRANULARITY * GRANULARITY
        end = -(-(offset + length) // GRANULARITY) * GRANULARITY
        covered[start:end] = b"\1" * (end - start)
    for offset in range(0, SIZE, GRANULARITY):
        piece = slice(offset, offset + GRANULARITY)
        expected = data[piece] if covered[offset] else old[piece]
        assert got[piece] == expected, offset
    assert got[3 * MiB : 4 * MiB] == bytes(MiB)


def test_no_ranges_leave_the_target_as_it_was(tmp_path: Path) -> None:
    source, target = tmp_path / "src.raw", tmp_path / "dst.raw"
    source.write_bytes(os.urandom(MiB))
    old = os.urandom(MiB)
    target.write_bytes(old)
    copy_ranges(Endpoint(raw_source(str(source))),
                Endpoint({"driver": "raw", "file": {"driver": "file", "filename": str(target)}}),
                [], MiB, "vdb")
    assert target.read_bytes() == old


def test_ranges_asked_once_both_are_open(tmp_path: Path) -> None:
    """A callable gives the ranges after the daemon opened both ends; None copies nothing."""
    source, target = tmp_path / "src.raw", tmp_path / "dst.raw"
    data, old = os.urandom(MiB), os.urandom(MiB)
    source.write_bytes(data)
    target.write_bytes(old)
    ends = (Endpoint(raw_source(str(source))),
            Endpoint({"driver": "raw", "file": {"driver": "file", "filename": str(target)}}))
    assert copy_ranges(*ends, lambda: None, MiB, "vdb") is False
    assert target.read_bytes() == old
    assert copy_ranges(*ends, lambda: [(GRANULARITY, 1)], MiB, "vdb") is True
    expected = old[:GRANULARITY] + data[GRANULARITY : 2 * GRANULARITY] + old[2 * GRANULARITY :]
    assert target.read_bytes() == expected
