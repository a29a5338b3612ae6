"""An NBD volume's damage record and its listing of unreadable manifests (export in memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.uri import NbdAddress, parse_target
from libvirt_rdm_backup.targets.volume_format import DAMAGE_OFFSET, SLOT, Superblock
from tests.oracles import newest_superblock
from tests.unit.test_repository_damage_units import UUID, vdb

SIZE = 64 << 20


class MemoryExport:
    """The few calls of a libnbd handle a volume makes, on a bytearray."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        self.data = bytearray(size)
        self.read_only = read_only

    def pread(self, count: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + count])

    def pwrite(self, buf: bytes, offset: int) -> None:
        assert not self.read_only
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        pass

    def is_read_only(self) -> bool:
        return self.read_only

    def shutdown(self) -> None:
        pass


def volume(export: MemoryExport) -> NbdVolume:
    """The volume in ``export`` (formatted when empty), as :meth:`NbdVolume.open` reads it."""
    address = parse_target("nbd://127.0.0.1/vol")
    assert isinstance(address, NbdAddress)
    newest = newest_superblock(export.pread(SLOT, 0), export.pread(SLOT, SLOT))
    if newest is None:  # formatted as a first backup does
        newest = Superblock("abc123")
        export.pwrite(newest.to_bytes(), 0)
    vol = NbdVolume(address, export, newest, SIZE)
    vol.settle = 0.0  # one writer here: no claim to wait for
    return vol


def publish_to(vol: NbdVolume, count: int) -> list[Manifest]:
    """Publish ``count`` one-disk backups (manifests only: the regions stay empty)."""
    published: list[Manifest] = []
    for index in range(count):
        backup_id = f"2026010{index + 1}T000000Z-00000{index}"
        parent = published[-1].backup_id if published else None
        level = "incremental" if parent else "full"
        record = DiskRecord(disk=vdb(), size=1 << 30, data_file="vdb.qcow2", format="qcow2",
                            digest=Digest("sha256", "0" * 64), level=level, data_path="qemu",
                            bytes_transferred=0, stored_bytes=0, parent=parent,
                            location={"offset": vol.allocate(1 << 20), "region": 1 << 20,
                                      "length": 0})
        manifest = Manifest(backup_id=backup_id, domain_uuid=UUID, domain_name="vm",
                            level=level, created=backup_id, completed=backup_id,
                            consistency={}, domain_xml="<domain/>", disks=[record],
                            parent=parent)
        vol.publish(manifest)
        published.append(manifest)
    return published


def test_damage_is_kept_apart_from_the_table_of_contents() -> None:
    export = MemoryExport(SIZE)
    vol = volume(export)
    ids = publish_to(vol, 3)
    slots = bytes(export.data[:DAMAGE_OFFSET]), bytes(export.data[SLOT:2 * SLOT])
    assert vol.set_damage_mark(ids[1], "vdb", "vdb.qcow2: sha256 mismatch")
    assert bytes(export.data[:DAMAGE_OFFSET]) == slots[0]  # no superblock written
    assert bytes(export.data[SLOT:2 * SLOT]) == slots[1]

    again = volume(export)  # a later run reads it back
    assert "sha256 mismatch" in str(again.damage_mark(ids[1], "vdb"))
    assert again.damage_mark(ids[1], "sda") is None and again.damage_mark(ids[0], "vdb") is None
    assert again.set_damage_mark(ids[1], "vdb", None)
    assert volume(export).damage_mark(ids[1], "vdb") is None


def test_a_read_only_export_keeps_no_record() -> None:
    export = MemoryExport(SIZE)
    ids = publish_to(volume(export), 1)
    export.read_only = True
    assert not volume(export).set_damage_mark(ids[0], "vdb", "damaged")


def test_a_corrupt_record_reads_as_none() -> None:
    export = MemoryExport(SIZE)
    vol = volume(export)
    ids = publish_to(vol, 1)
    assert vol.set_damage_mark(ids[0], "vdb", "damaged")
    export.data[DAMAGE_OFFSET + 60] ^= 0xFF
    assert volume(export).damage_mark(ids[0], "vdb") is None


def test_unreadable_manifests_are_listed_apart() -> None:
    export = MemoryExport(SIZE)
    vol = volume(export)
    ids = [m.backup_id for m in publish_to(vol, 3)]
    offset, _ = vol.superblock.entries[1]["manifest"]
    export.data[offset] = ord("#")
    readable, damaged = vol.scan()
    assert [m.backup_id for m in readable] == [ids[0], ids[2]]
    assert [(d.backup_id, d.domain_uuid) for d in damaged] == [(ids[1], UUID)]
    assert "malformed manifest" in damaged[0].problem
    export.data[offset] = 0xFF
    assert "not UTF-8" in vol.scan()[1][0].problem


@pytest.mark.hostile
def test_a_new_layer_is_read_back_only_through_the_header_that_was_checked(
        tmp_path: Path) -> None:
    """After the copy, the checks read the new layer's header from the server once, check
    it and pin it: a server that swaps in a header naming a data file fails the backup."""
    import struct
    from dataclasses import replace

    from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
    from libvirt_rdm_backup.engine.sinks import NbdSink
    from libvirt_rdm_backup.errors import VerificationError
    from libvirt_rdm_backup.modes import Level

    export = MemoryExport(SIZE)
    vol = volume(export)
    sink = NbdSink(vol, str(tmp_path))
    plan = DiskPlan(replace(vdb(), size=4 << 20), DataPath.QEMU, Level.FULL, "test")
    sink.create(plan)
    offset = int(sink.locations["vdb"]["offset"])
    assert sink.read_back(plan).startswith("json:")  # the header this tool wrote
    features = struct.unpack(">Q", export.pread(8, offset + 72))[0]
    export.pwrite(struct.pack(">Q", features | 1 << 2), offset + 72)  # "external data file"
    with pytest.raises(VerificationError, match="data file"):
        sink.read_back(plan)
