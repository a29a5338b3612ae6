"""Resyncs without a chunk map: pieces read side by side, the chunks written, and the
disk's reads paced to ``--bwlimit``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import pytest

from libvirt_rdm_backup.engine import readback, resync
from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.engine.readback import (
    _compare,
    _merged,
    parent_images,
    readback_layer,
)
from libvirt_rdm_backup.modes import Level
from libvirt_rdm_backup.pacing import Pacer, paced
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.nbd_io import REQUEST, LayerWriter
from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server
from libvirt_rdm_backup.repository.chain import chain_of
from libvirt_rdm_backup.repository.chunks import ALGORITHM, CHUNK, DIGEST_SIZE, ChunkMap
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository
from tests.unit.test_repository_damage_units import IDS, SIZE, UUID, layer, vdb

MiB = 1 << 20


class Recorder:
    """Stands for a layer writer: notes data writes and zero requests."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.zeros: list[tuple[int, int]] = []

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, bytes(data)))

    def zero(self, offset: int, length: int) -> None:
        self.zeros.append((offset, length))

    def finish(self) -> None:
        pass


def test_pieces_skip_what_both_read_as_zero_and_split_the_rest() -> None:
    size = 12 * MiB
    disk = iter([(0, 2 * MiB, False), (2 * MiB, 6 * MiB, True), (8 * MiB, 4 * MiB, False)])
    point = iter([(0, 4 * MiB, True), (4 * MiB, 8 * MiB, False)])
    pieces = list(_merged(disk, point))
    assert pieces == [
        (0, 2 * MiB, False, True),
        (4 * MiB, 4 * MiB, True, False),
        (8 * MiB, 4 * MiB, False, False),
    ]
    whole = list(_merged(iter([(0, size, False)]), iter([(0, size, False)])))
    assert [p[:2] for p in whole] == [(o, REQUEST) for o in range(0, size, REQUEST)]
    assert sum(p[1] for p in whole) == size
    assert list(_merged(iter([(0, size, True)]), iter([(0, size, True)]))) == []


def test_only_differing_chunks_are_written_zeroed_ones_as_zero_requests() -> None:
    length = 8 * CHUNK + 100  # the disk's last chunk is partial
    old = bytearray(b"o" * length)
    new = bytearray(old)
    new[CHUNK:3 * CHUNK] = b"n" * (2 * CHUNK)  # two neighbours: one write
    new[4 * CHUNK:5 * CHUNK] = bytes(CHUNK)  # became zero: a zero request
    new[5 * CHUNK + 7] = 0x21  # one byte of the next chunk
    new[-1] = 0x22  # the partial last chunk
    writer = Recorder()
    _compare(cast(LayerWriter, writer), 10 * MiB, length, memoryview(new), memoryview(old))
    assert [(o - 10 * MiB, len(d)) for o, d in writer.writes] == [
        (CHUNK, 2 * CHUNK), (5 * CHUNK, CHUNK), (8 * CHUNK, 100)]
    assert writer.zeros == [(10 * MiB + 4 * CHUNK, CHUNK)]
    assert writer.writes[0][1] == bytes(new[CHUNK:3 * CHUNK])


def test_one_side_reading_as_zero() -> None:
    data = bytearray(3 * CHUNK)
    data[CHUNK:2 * CHUNK] = b"x" * CHUNK
    view = memoryview(data)
    # the point reads as zero there: only the disk's data chunk is written
    writer = Recorder()
    _compare(cast(LayerWriter, writer), 0, len(data), view, None)
    assert [(o, len(d)) for o, d in writer.writes] == [(CHUNK, CHUNK)] and not writer.zeros
    # the disk reads as zero there: the point's data chunk is zeroed, nothing else
    writer = Recorder()
    _compare(cast(LayerWriter, writer), 0, len(data), None, view)
    assert writer.zeros == [(CHUNK, CHUNK)] and not writer.writes
    writer = Recorder()
    _compare(cast(LayerWriter, writer), 0, len(data), view, view)
    assert not writer.writes and not writer.zeros


class FakeTime:
    """A clock that moves only when slept on or when a read is said to take time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def _read(requests: list[tuple[int, int, bool]], pacer: Pacer, fake: FakeTime,
          rate: float | None = None) -> list[tuple[int, int, bool]]:
    """The requests as the disk's stream takes them, each data read taking length/rate
    seconds (None: no time); at every read, what was asked for keeps within one piece of
    the pace since the first."""
    got = []
    start = None
    for request in paced(iter(requests), pacer):
        start = fake.now if start is None else start
        assert pacer.taken <= pacer.speed * (fake.now - start) + REQUEST + 1  # float error
        got.append(request)
        if rate is not None and not request[2]:
            fake.now += request[1] / rate
    return got


def test_reads_are_paced_to_the_limit_over_the_whole_run() -> None:
    fake = FakeTime()
    limit = 8 * MiB
    pacer = Pacer(limit, fake.clock, fake.sleep)
    # 64 MiB of data in 4 MiB pieces, with 1 GiB reading as zero in between (not read)
    requests = [(o, REQUEST, False) for o in range(0, 32 * MiB, REQUEST)]
    requests.append((32 * MiB, 1024 * MiB, True))
    requests += [(o, REQUEST, False) for o in range(1056 * MiB, 1088 * MiB, REQUEST)]
    assert _read(requests, pacer, fake) == requests  # in order, none left out
    data = 64 * MiB
    assert pacer.taken == data
    # bytes / limit in all, but for the last piece, read as soon as its turn came
    assert sum(fake.sleeps) == pytest.approx((data - REQUEST) / limit)
    assert pacer.waited == pytest.approx(sum(fake.sleeps))
    assert len(fake.sleeps) == 15  # one piece at a time: every piece after the first
    assert pacer.describe() == f"{data} bytes read at most 8 MiB/s ({pacer.waited:.2f} s waited)"


def test_reads_slower_than_the_limit_wait_only_for_what_they_are_ahead() -> None:
    fake = FakeTime()
    requests = [(o, REQUEST, False) for o in range(0, 40 * MiB, REQUEST)]
    # far above the rate the storage gives: no wait at all
    pacer = Pacer(1024 * MiB, fake.clock, fake.sleep)
    _read(requests, pacer, fake, rate=100 * MiB)
    assert fake.sleeps == [] and pacer.waited == 0
    # a limit of half the rate: half the run is spent waiting
    fake = FakeTime()
    pacer = Pacer(50 * MiB, fake.clock, fake.sleep)
    began = fake.now
    _read(requests, pacer, fake, rate=100 * MiB)
    assert sum(fake.sleeps) == pytest.approx(36 * MiB / (100 * MiB))
    # the limit on average, but for the last piece, read at the storage's rate
    assert fake.now - began == pytest.approx(36 * MiB / (50 * MiB) + REQUEST / (100 * MiB))


def test_a_pacer_only_with_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    monkeypatch.setattr(readback, "Pacer", lambda speed: made.append(speed))
    monkeypatch.setattr(readback, "qemu_nbd_server", _no_server)
    with pytest.raises(_Stop):
        readback.readback_layer("nbd://disk", {}, {}, MiB, "disk vdb")
    assert made == []
    with pytest.raises(_Stop):
        readback.readback_layer("nbd://disk", {}, {}, MiB, "disk vdb", 0)
    assert made == []
    with pytest.raises(_Stop):
        readback.readback_layer("nbd://disk", {}, {}, MiB, "disk vdb", 8 * MiB)
    assert made == [8 * MiB]
    with pytest.raises(ValueError, match="positive"):
        Pacer(0)


class _Stop(Exception):
    pass


def _no_server(*_args: object, **_kwargs: object) -> None:
    raise _Stop


def test_a_map_based_resync_paces_its_reads_of_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resync compared with a chunk map reads the disk itself: its data reads (the ranges
    the storage reported) are taken from the pacer before they are read; none without one."""
    size = 64 * MiB
    parent = ChunkMap(size, CHUNK, ALGORITHM, bytearray(DIGEST_SIZE * (size // CHUNK)))
    asked: list[tuple[int, int, bool]] = []

    def fake_stream(_source: object, pieces: Iterable[tuple[int, int, bool]]
                    ) -> Iterator[tuple[int, int, None]]:
        for offset, length, zero in pieces:
            asked.append((offset, length, zero))
            yield offset, length, None  # read as zero: nothing to compare or write

    monkeypatch.setattr(resync, "stream", fake_stream)
    only = [(0, 8 * MiB), (32 * MiB + 100, 4 * MiB)]  # widened to whole chunks
    fake = FakeTime()
    pacer = Pacer(4 * MiB, fake.clock, fake.sleep)
    resync._resync(object(), cast(LayerWriter, Recorder()), size, parent, None, only, pacer)
    data = 8 * MiB + 4 * MiB + CHUNK
    # one request at a time: the 8 MiB range in two, the other (widened) in one and a chunk
    assert asked == [(0, REQUEST, False), (REQUEST, REQUEST, False),
                     (32 * MiB, REQUEST, False), (36 * MiB, CHUNK, False)]
    assert pacer.taken == data
    # each read waited for the ones before it, at 4 MiB/s: 1 s per 4 MiB request
    assert fake.sleeps == pytest.approx([1.0, 1.0, 1.0])
    asked.clear()
    resync._resync(object(), cast(LayerWriter, Recorder()), size, parent, None, only)
    assert asked == [(0, 8 * MiB, False), (32 * MiB, REQUEST + CHUNK, False)]  # as they are


def test_a_map_based_resync_makes_a_pacer_only_with_a_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    monkeypatch.setattr(resync, "Pacer", lambda speed: made.append(speed))
    monkeypatch.setattr(resync, "connect_nbd", _no_server)
    parent = ChunkMap(MiB, CHUNK, ALGORITHM, bytearray(DIGEST_SIZE * (MiB // CHUNK)))
    for speed in (None, 0, 8 * MiB):
        with pytest.raises(_Stop):
            if speed is None:
                resync.resync_layer("nbd://disk", MiB, parent, "/nonexistent/l", "b.qcow2")
            else:
                resync.resync_layer("nbd://disk", MiB, parent, "/nonexistent/l", "b.qcow2",
                                    speed=speed)
    assert made == [8 * MiB]


def _layer_with(path: Path, writes: list[tuple[int, int]]) -> None:
    """A plain qcow2 layer of the disk's size holding ``writes`` ((pattern, offset) of
    64 KiB each)."""
    img.create(str(path), "qcow2", SIZE)
    for pattern, offset in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -q -P {pattern} {offset} {CHUNK}", str(path)], check=True)


@pytest.mark.hostile
def test_the_point_read_back_is_the_layer_file_that_was_checked(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    with repo.lock(UUID), repo.staging(UUID, IDS[0]) as staging:
        data = Path(staging.file("vdb.qcow2"))
        _layer_with(data, [(0x41, 0)])
        record = DiskRecord(disk=vdb(), size=SIZE, data_file=data.name, format="qcow2",
                            digest=file_digest(str(data)), level="full", data_path="qemu",
                            bytes_transferred=CHUNK, stored_bytes=CHUNK,
                            file_size=data.stat().st_size)  # no chunk map: read back
        repo.publish(staging, Manifest(
            backup_id=IDS[0], domain_uuid=UUID, domain_name="vm", level="full",
            created=IDS[0], completed=IDS[0], consistency={}, domain_xml="<domain/>",
            disks=[record]))
    chain = chain_of(FileStore(repo).scan(UUID)[0], "default")
    plan = DiskPlan(disk=vdb(), path=DataPath.QEMU, level=Level.RESYNC, reason="resync",
                    parent=chain.last_point("vdb"))
    disk = tmp_path / "disk.raw"  # what the disk holds now: the point, and one more chunk
    with open(disk, "wb") as stream:
        stream.truncate(SIZE)
        stream.write(b"\x41" * CHUNK)
        stream.seek(2 * CHUNK)
        stream.write(b"\x42" * CHUNK)
    new = tmp_path / "new.qcow2"
    img.create(str(new), "qcow2", SIZE)
    with FileStore(repo) as store:  # holds the layer files it checked until closed
        images = parent_images(store, chain, [plan])
        # once checked, the point's layer is swapped for a file that holds what the disk
        # holds: read back, it would hide the chunk that changed
        fake = tmp_path / "fake.qcow2"
        _layer_with(fake, [(0x41, 0), (0x42, 2 * CHUNK)])
        os.rename(fake, layer(repo, IDS[0]))
        with qemu_nbd_server(str(disk), "raw", readonly=True) as disk_uri:
            written = readback_layer(disk_uri, images["vdb"], {
                "driver": "qcow2", "file": {"driver": "file", "filename": str(new)},
                "backing": None}, SIZE, "disk vdb")
    assert written == CHUNK
