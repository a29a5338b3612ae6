"""Resyncs without a chunk map: pieces read side by side and the chunks written."""

from __future__ import annotations

from typing import cast

from libvirt_rdm_backup.engine.readback import _compare, _merged
from libvirt_rdm_backup.qemu.nbd_io import REQUEST, LayerWriter
from libvirt_rdm_backup.repository.chunks import CHUNK

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
