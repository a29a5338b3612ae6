"""Storage snapshots on the real lab: a tgtd LUN and a loop device, both over files on the
lab's reflink XFS.

For each agent: write, snapshot A, write more at known offsets, snapshot B, present
both and read them with ``qemu-img convert``, compare with what was written at each
point, check the changed ranges between A and B, then delete everything and check
that nothing is left. The writes are left where only the agent's flush can get them
into the snapshot: in tgtd's page cache (the initiator never flushes) and in the
loop device's own page cache (a buffered writer keeps its fd open).
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import CommandError, StorageError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import reflink, tgt
from libvirt_rdm_backup.storage.clones import SNAPSHOT_DIR
from libvirt_rdm_backup.storage.loop_snapshots import LoopReflinkAgent
from libvirt_rdm_backup.storage.snapshot_agents import agent_by_name, find_snapshot_agent
from libvirt_rdm_backup.storage.snapshots import (
    Presented,
    SnapshotAgent,
    StorageSnapshot,
    new_snapshot_name,
)
from libvirt_rdm_backup.storage.tgt_snapshots import TgtReflinkAgent
from tools.labkit import is_root, iscsi_target, loop_device, rdmb_reflink_tmpdir, rdmb_tmpdir

pytestmark = pytest.mark.lab

KiB = 1 << 10
MiB = 1 << 20
FS_BLOCK = 4 * KiB
MAX_SNAPSHOT_S = 0.5  # generous: the measured times are a few milliseconds


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """(a directory on the reflink XFS for backing files, a scratch directory for reads)."""
    if not is_root():
        pytest.skip("needs root (tgtadm, loop devices, the lab's reflink XFS)")
    with rdmb_reflink_tmpdir() as xfs, rdmb_tmpdir() as scratch:
        yield xfs, scratch


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        out.truncate(size)
    return path


def _pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


def _expected_ranges(writes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges widened to filesystem blocks, sorted and merged."""
    spans: list[list[int]] = []
    for offset, length in sorted(writes):
        start = offset // FS_BLOCK * FS_BLOCK
        end = -(-(offset + length) // FS_BLOCK) * FS_BLOCK
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [(a, b - a) for a, b in spans]


def _read_presented(presented: Presented, size: int, out: Path) -> bytes:
    """The disk's bytes as ``qemu-img convert`` reads them from the presented snapshot."""
    if presented.source.startswith("iscsi://"):
        source = presented.source
    else:
        source = "json:" + json.dumps({
            "driver": "raw", "offset": presented.offset, "size": size,
            "file": {"driver": "file", "filename": presented.source},
        })  # fmt: skip
    run(["qemu-img", "convert", "-O", "raw", source, str(out)], timeout=120)
    data = out.read_bytes()
    out.unlink()
    return data


def _timed_snapshot(agent: SnapshotAgent, disk: RawDisk, stack: ExitStack,
                    times: list[float]) -> StorageSnapshot:
    name = new_snapshot_name(disk.target)
    started = time.perf_counter()
    snap = agent.snapshot(disk, name)
    times.append(time.perf_counter() - started)
    stack.callback(agent.delete, disk, snap)
    return snap


def _check_snapshot(snap: StorageSnapshot, agent: SnapshotAgent, disk: RawDisk) -> None:
    assert (snap.agent, snap.disk) == (agent.name, disk.target)
    assert snap.name.startswith("rdmb-") and snap.created.endswith("Z")
    assert StorageSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap
    assert agent.exists(disk, snap)
    clone = Path(snap.handle["clone"])
    assert clone.parent.name == SNAPSHOT_DIR and clone.parent.stat().st_mode & 0o777 == 0o700


def _report(request: pytest.FixtureRequest, agent: str, times: list[float], note: str) -> None:
    ms = ", ".join(f"{t * 1000:.1f} ms" for t in times)
    line = f"{agent}: snapshot() took {ms}; {note}"
    request.node.user_properties.append(("snapshot_times", line))
    print(line)
    assert max(times) < MAX_SNAPSHOT_S, line


# -- tgtd LUN ----------------------------------------------------------------------


def _iscsi_write(url: str, writes: list[tuple[int, int, int]]) -> None:
    """Write patterns through iSCSI; ``-t unsafe`` drops flushes: tgtd never fdatasyncs."""
    commands: list[str] = []
    for offset, length, byte in writes:
        commands += ["-c", f"write -P {byte:#x} {offset} {length}"]
    run(["qemu-io", "-f", "raw", "-t", "unsafe", url, *commands], timeout=120)


def _apply(model: bytearray, writes: list[tuple[int, int, int]]) -> None:
    for offset, length, byte in writes:
        model[offset : offset + length] = _pattern(byte, length)


def test_tgt_reflink_snapshots(dirs: tuple[Path, Path], request: pytest.FixtureRequest) -> None:
    xfs, scratch = dirs
    size = 64 * MiB
    backing = _sparse(xfs / "lun.img", size)
    snapshot_dir = xfs / SNAPSHOT_DIR
    times: list[float] = []
    with iscsi_target(backing) as lun:
        disk = RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=lun.source)
        agent = TgtReflinkAgent()
        assert agent.can_snapshot(disk)
        assert isinstance(find_snapshot_agent(disk), TgtReflinkAgent)
        assert isinstance(agent_by_name(agent.name), TgtReflinkAgent)

        model = bytearray(size)
        first = [(0, 4 * MiB, 0x11), (10 * MiB, MiB, 0x22), (40 * MiB + 512, 3 * 512, 0x23)]
        _iscsi_write(lun.url, first)
        _apply(model, first)
        model_a = bytes(model)
        extents = reflink.file_extents(str(backing), sync=False)
        in_page_cache = any(e[3] & reflink.FIEMAP_EXTENT_DELALLOC for e in extents)

        with ExitStack() as stack:
            snap_a = _timed_snapshot(agent, disk, stack, times)
            second = [
                (MiB, 64 * KiB, 0x33),  # over data of A
                (30 * MiB + 512, 1024, 0x44),  # unaligned to fs blocks, into a hole
                (10 * MiB + 1536, 4096, 0x55),  # across a fs block boundary
                (size - MiB, MiB, 0x66),  # the end of the disk
            ]
            _iscsi_write(lun.url, second)
            _apply(model, second)
            snap_b = _timed_snapshot(agent, disk, stack, times)
            for snap in (snap_a, snap_b):
                _check_snapshot(snap, agent, disk)
                assert snap.size == size

            presented_a = agent.present(disk, snap_a)
            presented_b = agent.present(disk, snap_b)
            assert agent.present(disk, snap_a) == presented_a  # idempotent
            for snap, presented in ((snap_a, presented_a), (snap_b, presented_b)):
                assert presented.source == (
                    f"iscsi://127.0.0.1:3260/{lun.iqn}:{snap.name}/1"
                ) and presented.offset == 0
                target = tgt.find_target(f"{lun.iqn}:{snap.name}")
                assert target is not None and target.acl == ("127.0.0.1",)
                target_lun = target.lun(1)
                assert target_lun is not None and target_lun.readonly
            assert _read_presented(presented_a, size, scratch / "a.raw") == model_a
            assert _read_presented(presented_b, size, scratch / "b.raw") == bytes(model)
            with pytest.raises(CommandError, match="write protected"):
                _iscsi_write(presented_b.source, [(0, 512, 0x77)])

            changed = agent.changed_ranges(disk, snap_a, snap_b)
            assert changed == _expected_ranges([(o, n) for o, n, _ in second])
            assert agent.changed_ranges(disk, snap_b, snap_b) == []

            agent.withdraw(disk, snap_a)
            agent.withdraw(disk, snap_a)
            assert tgt.find_target(f"{lun.iqn}:{snap_a.name}") is None
            for snap in (snap_a, snap_b):
                agent.delete(disk, snap)
                agent.delete(disk, snap)
                assert not agent.exists(disk, snap)
            with pytest.raises(StorageError, match="is gone"):
                agent.present(disk, snap_a)
            assert agent.changed_ranges(disk, snap_a, snap_b) is None
        assert not snapshot_dir.exists()
    assert not any(t.iqn.startswith(lun.iqn) for t in tgt.show_targets())
    _report(request, agent.name, times,
            f"dirty data in tgtd's page cache at snapshot A: {in_page_cache}")


# -- loop device -------------------------------------------------------------------


def _direct_write(device: str, offset: int, data: bytes) -> None:
    """An O_DIRECT write (page-aligned buffer)."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def test_loop_reflink_snapshots(dirs: tuple[Path, Path], request: pytest.FixtureRequest) -> None:
    xfs, scratch = dirs
    loop_offset, size = MiB, 48 * MiB
    backing = _sparse(xfs / "loop.img", 64 * MiB)
    snapshot_dir = xfs / SNAPSHOT_DIR
    times: list[float] = []
    with loop_device(backing, offset=loop_offset, sizelimit=size) as device:
        disk = RawDisk("vdb", SourceKind.BLOCK, "lun", source_path=device)
        agent = LoopReflinkAgent()
        assert agent.can_snapshot(disk)
        assert isinstance(find_snapshot_agent(disk), LoopReflinkAgent)
        assert not TgtReflinkAgent().can_snapshot(disk)

        model = bytearray(size)
        # a buffered writer that keeps its fd open: its writes stay in the loop device's
        # page cache (closing the last fd would write them back)
        writer = os.open(device, os.O_WRONLY)
        try:
            _direct_write(device, 0, _pattern(0x11, 4 * MiB))
            model[0 : 4 * MiB] = _pattern(0x11, 4 * MiB)
            for offset, length, byte in [(8 * MiB, MiB, 0x12), (20 * MiB + 100, 10, 0x13)]:
                os.pwrite(writer, _pattern(byte, length), offset)
                model[offset : offset + length] = _pattern(byte, length)
            with backing.open("rb") as stream:
                stream.seek(loop_offset + 8 * MiB)
                only_in_loop_cache = stream.read(16) == bytes(16)
            model_a = bytes(model)

            with ExitStack() as stack:
                snap_a = _timed_snapshot(agent, disk, stack, times)
                second = [
                    (MiB, 64 * KiB, 0x21),  # over data of A
                    (20 * MiB + 4090, 10, 0x22),  # across a fs block boundary
                    (30 * MiB + 100, 5000, 0x23),  # unaligned, into a hole
                    (size - 4 * KiB, 4 * KiB, 0x24),  # the last block of the disk
                ]
                for offset, length, byte in second:
                    os.pwrite(writer, _pattern(byte, length), offset)
                    model[offset : offset + length] = _pattern(byte, length)
                _direct_write(device, 40 * MiB, _pattern(0x25, 64 * KiB))
                model[40 * MiB : 40 * MiB + 64 * KiB] = _pattern(0x25, 64 * KiB)
                second.append((40 * MiB, 64 * KiB, 0x25))
                # outside the loop's window of the backing file: not a change of the disk
                with backing.open("r+b") as stream:
                    stream.write(_pattern(0x99, 64 * KiB))
                snap_b = _timed_snapshot(agent, disk, stack, times)
                for snap in (snap_a, snap_b):
                    _check_snapshot(snap, agent, disk)
                    assert snap.size == size
                    assert snap.handle["offset"] == loop_offset

                presented_a, presented_b = agent.present(disk, snap_a), agent.present(disk, snap_b)
                assert presented_a == Presented(snap_a.handle["clone"], loop_offset)
                assert _read_presented(presented_a, size, scratch / "a.raw") == model_a
                assert _read_presented(presented_b, size, scratch / "b.raw") == bytes(model)

                changed = agent.changed_ranges(disk, snap_a, snap_b)
                assert changed == _expected_ranges([(o, n) for o, n, _ in second])

                for snap in (snap_a, snap_b):
                    agent.withdraw(disk, snap)
                    agent.delete(disk, snap)
                    agent.delete(disk, snap)
                    assert not agent.exists(disk, snap)
            assert not snapshot_dir.exists()
        finally:
            os.close(writer)
    assert not run(["losetup", "-j", str(backing)]).stdout.strip()
    _report(request, agent.name, times,
            f"data only in the loop device's page cache at snapshot A: {only_in_loop_cache}")


def test_snapshot_names_are_checked(dirs: tuple[Path, Path]) -> None:
    xfs, _scratch = dirs
    backing = _sparse(xfs / "named.img", MiB)
    with loop_device(backing) as device:
        disk = RawDisk("vdc", SourceKind.BLOCK, "disk", source_path=device)
        for bad in ("snap-1", "rdmb-UPPER", "rdmb-a/b", "rdmb-" + "x" * 64):
            with pytest.raises(StorageError, match="invalid snapshot name"):
                LoopReflinkAgent().snapshot(disk, bad)
        snap = LoopReflinkAgent().snapshot(disk, new_snapshot_name("Disk_0/x"))
        assert snap.name.startswith("rdmb-disk-0-x-")
        LoopReflinkAgent().delete(disk, snap)
    assert not (xfs / SNAPSHOT_DIR).exists()
    with pytest.raises(StorageError, match="unknown snapshot agent"):
        agent_by_name("nope")
