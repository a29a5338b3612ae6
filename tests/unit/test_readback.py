"""Resyncs without a chunk map: pieces read side by side and the chunks written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import cast

import pytest

from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.engine.readback import (
    _compare,
    _merged,
    parent_images,
    readback_layer,
)
from libvirt_rdm_backup.modes import Level
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.nbd_io import REQUEST, LayerWriter
from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server
from libvirt_rdm_backup.repository.chain import chain_of
from libvirt_rdm_backup.repository.chunks import CHUNK
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
