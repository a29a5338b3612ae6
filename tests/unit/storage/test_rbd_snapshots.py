"""The rbd snapshot agent's pure parts: which disks it takes, how diff_iterate's extents
become changed ranges (fast-diff narrowing, then exact)."""

from __future__ import annotations

from typing import Any

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.storage import rbd as ceph
from libvirt_rdm_backup.storage.rbd_snapshots import RbdSnapshotAgent, diff_ranges

MiB = 1 << 20


class FakeImage:
    """diff_iterate over known extents: by object (4 MiB) when ``whole_object``."""

    def __init__(self, extents: list[tuple[int, int]], fast: bool, invalid: bool = False):
        self.extents, self.fast, self.invalid = extents, fast, invalid
        self.calls: list[tuple[int, int, bool]] = []

    def features(self) -> int:
        return int(ceph.rbd.RBD_FEATURE_FAST_DIFF) if self.fast else 0

    def flags(self) -> int:
        return int(ceph.rbd.RBD_FLAG_FAST_DIFF_INVALID) if self.invalid else 0

    def diff_iterate(self, offset: int, length: int, older: str, cb: Any,
                     include_parent: bool = True, whole_object: bool = False) -> None:
        assert older == "rdmb-old"
        self.calls.append((offset, length, whole_object))
        for start, size in self.extents:
            if whole_object:
                first, last = start // (4 * MiB), (start + size - 1) // (4 * MiB)
                start, size = first * 4 * MiB, (last - first + 1) * 4 * MiB
            end = min(start + size, offset + length)
            if end > max(start, offset):
                cb(max(start, offset), end - max(start, offset), True)


needs_bindings = pytest.mark.skipif(not ceph.HAVE_RBD, reason="no python3-rbd")


@needs_bindings
def test_fast_diff_narrows_to_objects_then_reads_exact_extents() -> None:
    image = FakeImage([(MiB, 64 * 1024), (MiB + 64 * 1024, 4096), (9 * MiB, 8192)], fast=True)
    assert diff_ranges(image, "rdmb-old", 64 * MiB) == [(MiB, 68 * 1024), (9 * MiB, 8192)]
    assert image.calls == [(0, 64 * MiB, True), (0, 4 * MiB, False),
                           (8 * MiB, 4 * MiB, False)]


@needs_bindings
@pytest.mark.parametrize("fast, invalid", [(False, False), (True, True)])
def test_without_a_valid_map_one_exact_pass(fast: bool, invalid: bool) -> None:
    image = FakeImage([(3 * MiB, 4096)], fast=fast, invalid=invalid)
    assert diff_ranges(image, "rdmb-old", 64 * MiB) == [(3 * MiB, 4096)]
    assert image.calls == [(0, 64 * MiB, False)]


def test_only_writable_rbd_disks() -> None:
    agent = RbdSnapshotAgent()
    block = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                    source_path="/dev/loop3")
    snapshot = RawDisk(target="vdc", source_kind=SourceKind.RBD, device="disk",
                       rbd=RbdSource("rbd", "img", snapshot="s1"))
    assert not agent.can_snapshot(block) and not agent.can_snapshot(snapshot)
