"""The record of a written layer: a plain local layer keeps a chunk map, an encrypted one
none (not even the map a resync computed), so no digest of the plain disk is stored."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import cast

import pytest

from libvirt_rdm_backup.consistency import Window
from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.engine.capture import Capture
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.engine.records import record_disk
from libvirt_rdm_backup.engine.sinks import LocalLayer, Session, Written
from libvirt_rdm_backup.modes import Level, WindowMethod
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.digest import Digest

SIZE = 1 << 20
DIGEST = Digest("sha256", "0" * 64)


class FakeSession:
    """What :func:`record_disk` asks of a session, for one local layer."""

    def __init__(self, layer: Path, layer_format: LayerFormat) -> None:
        self.layer_format = layer_format
        self._layer = layer

    def written(self, plan: DiskPlan) -> Written:
        return Written(image=str(self._layer), data_file=self._layer.name, stored_bytes=0,
                       local=LocalLayer(str(self._layer), [],
                                        str(self._layer.with_suffix(".chunks"))))

    def digest(self, plan: DiskPlan) -> Digest:
        return DIGEST


def plan(level: Level = Level.FULL) -> DiskPlan:
    disk = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                   source_path="/dev/loop3", size=SIZE, node_name="libvirt-vdb-format")
    return DiskPlan(disk, DataPath.QEMU, level, "test")


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "vdb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)],
                   check=True)
    return path


def captured(with_map: bool) -> Capture:
    found = Capture(files={}, window=Window(method=WindowMethod.OFFLINE))
    if with_map:  # as a resync leaves it
        found.chunk_maps["vdb"] = ChunkMap.zero(SIZE)
    return found


def test_a_plain_layer_keeps_its_chunk_map(layer: Path) -> None:
    session = cast(Session, FakeSession(layer, PLAIN))
    record = record_disk(plan(), session, captured(False), (None, None), None)
    assert record.chunk_map == "vdb.chunks" and record.chunk_map_digest is not None
    assert ChunkMap.load(str(layer.with_suffix(".chunks")), SIZE) == ChunkMap.zero(SIZE)


@pytest.mark.parametrize("resynced", [False, True])
def test_an_encrypted_layer_gets_no_chunk_map(layer: Path, resynced: bool) -> None:
    session = cast(Session, FakeSession(layer, LayerFormat(key_id="k" * 16)))
    record = record_disk(plan(Level.RESYNC if resynced else Level.FULL), session,
                         captured(resynced), (None, None), None)
    assert (record.chunk_map, record.chunk_map_digest) == (None, None)
    assert record.encryption is not None
    assert not layer.with_suffix(".chunks").exists()
