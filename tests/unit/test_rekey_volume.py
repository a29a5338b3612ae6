"""``rekey`` of an NBD volume without the lab: the volume is an export in memory holding
real LUKS layers (small qcow2 images made by qemu-img), QEMU's key slot changes stand-ins
that rewrite bytes of the LUKS header window. The journal's place in the table, its
ownership and publication; the refusal of other commands meanwhile; the checks of each
layer's LUKS header window; a run cut short finished by the next, and damage after it
refused. The real ``qemu-img amend`` of a window node runs once on a local file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from libvirt_rdm_backup.engine import rekey_volume
from libvirt_rdm_backup.engine.rekey_change import RekeyResult
from libvirt_rdm_backup.engine.rekey_volume_layer import open_layers, volume_record, window_problem
from libvirt_rdm_backup.engine.volume_store import VolumeStore
from libvirt_rdm_backup.errors import (
    CommandError,
    DamagedBackupError,
    OperationError,
    RepositoryError,
    UsageError,
)
from libvirt_rdm_backup.qemu import img, layers, luks_slots
from libvirt_rdm_backup.qemu.secrets import LayerKey, secret_definition
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Scan
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_format import (
    _HEAD,
    DATA_START,
    MAGIC,
    SLOT,
    Superblock,
)
from libvirt_rdm_backup.targets.volume_space import overlap, space_problem, subtract
from tests.oracles import newest_superblock
from tests.unit.test_rekey_layers import FAST, NEW, OLD, keys  # noqa: F401
from tests.unit.test_repository_damage_units import IDS, UUID, vdb
from tests.unit.test_volume_damage import MemoryExport, volume
from tests.unit.test_volume_space import TrimExport

DISK = 16 << 20  # the disk's size, the layers' virtual size
REGION = 8 << 20
SALT = "00112233445566778899aabbccddeeff"
OLD_ID = OLD.key_id(bytes.fromhex(SALT))
NEW_ID = NEW.key_id(bytes.fromhex(SALT))


def _layer(tmp_path: Path, key: Path, n: int) -> bytes:
    """The bytes of a LUKS-encrypted qcow2 layer holding a pattern of its own."""
    path = tmp_path / f"layer-{n}.qcow2"
    secret = secret_definition(str(key), "k")
    with img.objects(secret):  # retried while QEMU's key benchmark fails under load
        img.create(str(path), "qcow2", DISK, options={
            "encrypt.format": "luks", "encrypt.key-secret": "k", "encrypt.iter-time": FAST})
    node = layers.json_filename({"driver": "qcow2", "file": layers.file_node(str(path)),
                                 "encrypt": layers.encrypt_options("k")})
    subprocess.run(["qemu-io", "--object", secret, "-c",
                    f"write -q -P {0x41 + n} {n * 65536} 65536", node], check=True)
    return path.read_bytes()


def _publish(vol: NbdVolume, export: MemoryExport, data: list[bytes]) -> list[Manifest]:
    """One backup per layer (a full, then incrementals), its record naming OLD."""
    made: list[Manifest] = []
    for n, layer in enumerate(data):
        vol.take_lease()  # as a backup does: its regions are recorded in the lease
        offset = vol.allocate(REGION)
        export.pwrite(layer, offset)
        parent = made[-1].backup_id if made else None
        level = "incremental" if parent else "full"
        record = DiskRecord(disk=vdb(), size=DISK, data_file="vdb.qcow2", format="qcow2",
                            digest=Digest("sha256", hashlib.sha256(layer).hexdigest()),
                            level=level, data_path="qemu", bytes_transferred=65536,
                            stored_bytes=len(layer), parent=parent,
                            location={"offset": offset, "region": REGION,
                                      "length": len(layer)},
                            encryption={"format": "luks", "key_id": OLD_ID, "salt": SALT})
        manifest = Manifest(backup_id=IDS[n], domain_uuid=UUID, domain_name="vm", level=level,
                            created=IDS[n], completed=IDS[n], consistency={},
                            domain_xml="<domain/>", disks=[record], parent=parent)
        vol.publish(manifest)
        made.append(manifest)
    return made


@pytest.fixture(scope="module")
def layer_bytes(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Two LUKS layers encrypted with OLD (made once: each costs QEMU's key benchmark)."""
    work = tmp_path_factory.mktemp("layers")
    key = work / "old-key"
    with open(key, "wb") as stream:
        OLD.write_to(stream.fileno())
    return [_layer(work, key, n) for n in range(2)]


@pytest.fixture
def encrypted(layer_bytes: list[bytes], keys: dict[str, Path]  # noqa: F811
              ) -> tuple[NbdVolume, MemoryExport, list[Manifest]]:
    export = TrimExport(64 << 20, zeroes=True)
    vol = volume(export)
    return vol, export, _publish(vol, export, layer_bytes)


def _table(export: MemoryExport) -> Superblock:
    table = newest_superblock(export.pread(SLOT, 0), export.pread(SLOT, SLOT))
    assert table is not None
    return table


class FakeSlots:
    """QEMU's key slot changes, as their effect: a layer opens with the keys it holds, and
    each change rewrites bytes of its LUKS header window (``fail_after``: the add that
    fails, as a rekey killed there; ``torn``: after writing some of the window)."""

    def __init__(self, export: MemoryExport, fail_after: int | None = None,
                 torn: bool = False) -> None:
        self.export, self.fail_after, self.torn = export, fail_after, torn
        self.slots: dict[int, set[str]] = {}
        self.added = 0

    def _held(self, node: dict[str, object]) -> set[str]:
        return self.slots.setdefault(int(str(node["offset"])), {"old"})

    def _touch(self, node: dict[str, object], value: int) -> None:
        offset = int(str(node["offset"])) + 4096
        self.export.data[offset:offset + 64] = bytes([value]) * 64

    def opens_with(self, node: dict[str, object], _old: str, _new: str, new: bool) -> bool:
        return ("new" if new else "old") in self._held(node)

    def add_key(self, node: dict[str, object], _old: str, _new: str) -> bool:
        if self.fail_after is not None and self.added >= self.fail_after:
            if self.torn:  # the new slot's material written, not yet the header enabling it
                self._touch(node, 0x33)
            raise CommandError(["qemu-img", "amend"], -9, "killed")
        self.added += 1
        self._held(node).add("new")
        self._touch(node, 0x11)
        return True

    def remove_key(self, node: dict[str, object], _old: str, _new: str) -> None:
        self._held(node).discard("old")
        self._touch(node, 0x22)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("opens_with", "add_key", "remove_key"):
            monkeypatch.setattr(luks_slots, name, getattr(self, name))


def _rekey(vol: NbdVolume) -> RekeyResult:
    store = VolumeStore(vol)
    return rekey_volume._rekey(store, OLD, NEW)


def test_a_journal_in_a_volume_is_owned_until_the_change_is_published(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]]) -> None:
    vol, export, made = encrypted
    vol.write_rekey_journal('{"journal": 1}')
    table = _table(export)
    assert table.rekey is not None and table.lease is not None  # the writer keeps the lease
    offset, length = table.rekey
    assert length == len('{"journal": 1}') and offset % (1 << 20) == 0
    assert not overlap(table.free, [(offset, 1 << 20)])
    assert space_problem(table, vol.size) is None
    assert space_problem(replace(table, free=[(offset, 1 << 20)]), vol.size) is not None
    assert vol.read_rekey_journal() == '{"journal": 1}' and vol.rekey_pending()
    changed = [replace(m, disks=[replace(m.disks[0], digest=Digest("sha256", "1" * 64))])
               for m in made]
    vol.publish_rekeyed(changed)
    table = _table(export)
    assert table.rekey is None and table.lease is None and not vol.rekey_pending()
    assert overlap(table.free, [(offset, 1 << 20)]) or offset >= table.next_free
    listed = vol.scan().backups
    assert [m.backup_id for m in listed] == [m.backup_id for m in made]
    assert [m.sequence for m in listed] == [m.sequence for m in made]
    assert {m.disks[0].digest.value for m in listed} == {"1" * 64}


def test_other_commands_refuse_a_volume_whose_key_change_is_unfinished(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]]) -> None:
    vol, export, _made = encrypted
    vol.write_rekey_journal("{}")
    vol.release_lease()
    message = ("a key change of volume nbd://127.0.0.1:10809/vol is unfinished: run rekey "
               "again with the same two key files")
    with pytest.raises(OperationError, match=message):
        VolumeStore(volume(export), LayerKey(b"old key of the layers\n"))
    store = VolumeStore(volume(export))
    with pytest.raises(OperationError, match=message), store.reading(UUID):
        pass
    with pytest.raises(OperationError, match=message), store.lock(UUID):
        pass


def test_a_reader_that_waited_for_a_change_of_the_manifests_is_told_to_run_again(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]]) -> None:
    _vol, export, made = encrypted
    reader = VolumeStore(volume(export))  # listed before the change
    writer = volume(export)
    writer.write_rekey_journal("{}")
    writer.publish_rekeyed(made)  # every manifest written again, into new regions
    with pytest.raises(OperationError, match="run the command again"), reader.reading(UUID):
        pass
    with VolumeStore(volume(export)).reading(UUID):  # listed after it: read as it is
        pass


@pytest.mark.fault
@pytest.mark.parametrize("torn", [False, True], ids=["between-layers", "mid-slot"])
def test_a_volume_rekey_cut_short_is_finished_by_the_next(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]],
        monkeypatch: pytest.MonkeyPatch, torn: bool) -> None:
    vol, export, made = encrypted
    # the first layer gets its new slot, then a kill (mid-slot: the second layer's LUKS
    # header holds the material of a slot its header does not enable yet)
    slots = FakeSlots(export, fail_after=1, torn=torn)
    slots.install(monkeypatch)
    with pytest.raises(CommandError, match="rekey again with the same two key files"):
        _rekey(vol)
    table = _table(export)
    assert table.rekey is not None and table.lease is None
    assert [m.disks[0] for m in volume(export).scan().backups] == [m.disks[0] for m in made]
    journal = json.loads(volume(export).read_rekey_journal() or "")
    assert len(journal["layers"]) == 2
    with pytest.raises(UsageError, match="begun with"):
        rekey_volume._rekey(VolumeStore(volume(export)), NEW, OLD)
    slots.fail_after = None
    done = _rekey(volume(export))
    assert done.resumed and (done.layers, done.backups) == (2, 2)
    table = _table(export)
    assert table.rekey is None and table.lease is None
    for manifest in volume(export).scan().backups:
        record = manifest.disks[0]
        location = record.location or {}
        data = export.pread(int(location["length"]), int(location["offset"]))
        assert record.digest.value == hashlib.sha256(data).hexdigest()
        assert record.encryption == {"format": "luks", "key_id": NEW_ID, "salt": SALT}
    assert set(map(frozenset, slots.slots.values())) == {frozenset({"new"})}


def _luks(export: MemoryExport, manifest: Manifest) -> tuple[int, int]:
    location = manifest.disks[0].location or {}
    head = export.pread(layers.HEADER_READ, int(location["offset"]))
    region = layers.luks_region(head, int(location["length"]))
    assert region is not None
    return region


@pytest.mark.hostile
def test_damage_after_a_volume_rekey_cut_short_is_refused(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    vol, export, made = encrypted
    fakes = FakeSlots(export, fail_after=1)
    fakes.install(monkeypatch)
    with pytest.raises(CommandError):
        _rekey(vol)
    # the first layer's header changed; now its data changes too (outside the header)
    location = made[0].disks[0].location or {}
    offset = int(location["offset"]) + int(location["length"]) - 4096
    export.data[offset] ^= 0xFF
    before = _table(export)
    fakes.fail_after = None
    with pytest.raises(DamagedBackupError, match="is not what the rekey journal says"):
        _rekey(volume(export))
    after = _table(export)
    assert after.rekey == before.rekey and after.entries == before.entries
    # a layer whose header did not change is checked against its record
    second = made[1].disks[0].location or {}
    export.data[int(second["offset"]) + int(second["length"]) - 4096] ^= 0xFF
    fakes.slots = {}
    with pytest.raises(DamagedBackupError, match="is not what the rekey journal says"):
        _rekey(volume(export))
    assert _table(export).entries == before.entries


@pytest.mark.hostile
def test_a_luks_header_window_where_it_does_not_belong_is_refused(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]]) -> None:
    vol, export, made = encrypted
    found = open_layers(vol, vol.scan())
    assert len(found) == 2
    layer = found[(UUID, made[0].backup_id, "vdb")]
    assert layer.window == (layer.offset + _luks(export, made[0])[0], _luks(export, made[0])[1])
    assert layer.node(vol)["offset"] == layer.window[0]
    assert window_problem(layer.window, [(layer.window[0] + layer.window[1] - 512, 4096)])
    assert window_problem(layer.window, [(layer.offset, layer.window[0] - layer.offset)]) \
        is None

    def refusal(record: DiskRecord) -> str:
        """What open_layers says of the volume with a backup of ``record`` added."""
        copy = TrimExport(64 << 20)
        copy.data[:] = export.data
        vol2 = volume(copy)
        vol2.publish(Manifest(backup_id=IDS[2], domain_uuid=UUID, domain_name="vm",
                              level="full", created=IDS[2], completed=IDS[2], consistency={},
                              domain_xml="<domain/>", disks=[record]))
        with pytest.raises(DamagedBackupError) as err:
            open_layers(vol2, vol2.scan())
        return str(err.value)

    base = made[0].disks[0]
    location = base.location or {}
    luks = _luks(export, made[0])
    cases = {  # a record, and what the refusal names
        "LUKS header at": replace(base, encryption=None, location={
            **location, "offset": layer.window[0] // (1 << 20) * (1 << 20)}),
        "no LUKS header where QEMU puts one": replace(base, location={
            **location, "length": sum(luks) - 1}),
        "outside the volume": replace(base, location={**location, "offset": 1 << 40}),
        "is not a qcow2 image": replace(base, location={**location, "offset": 48 << 20}),
    }
    for problem, record in cases.items():
        assert problem in refusal(record)


@pytest.mark.hostile
@pytest.mark.parametrize("place", ["x", [DATA_START], [DATA_START, 0], [DATA_START + 1, 10],
                                   [SLOT, 10], [True, 10], [DATA_START, 17 << 20],
                                   [1 << 40, 10], [DATA_START, 2.5]])
def test_a_hostile_journal_place_is_a_damaged_table(place: object) -> None:
    table = Superblock("abc123", generation=3, next_free=64 << 20)
    doc = json.loads(table.to_bytes()[_HEAD.size:])
    body = json.dumps({**doc, "rekey": place}).encode()
    data = _HEAD.pack(MAGIC, 3, len(body), hashlib.sha256(body).digest()) + body
    with pytest.raises(ValueError, match="rekey journal place"):
        Superblock.parse(data)
    good = json.dumps({**doc, "rekey": [DATA_START, 10]}).encode()
    parsed = Superblock.parse(_HEAD.pack(MAGIC, 3, len(good), hashlib.sha256(good).digest())
                              + good)
    assert parsed is not None and parsed.rekey == (DATA_START, 10)


@pytest.mark.bad_input
def test_the_records_of_a_volume_name_one_key() -> None:
    def manifest(*encryptions: dict[str, str] | None) -> Manifest:
        disks = [DiskRecord(disk=replace(vdb(), target=f"vd{chr(98 + n)}"), size=DISK,
                            data_file="x.qcow2", format="qcow2",
                            digest=Digest("sha256", "0" * 64), level="full",
                            data_path="qemu", bytes_transferred=0, stored_bytes=0,
                            encryption=e) for n, e in enumerate(encryptions)]
        return Manifest(backup_id=IDS[0], domain_uuid=UUID, domain_name="vm", level="full",
                        created=IDS[0], completed=IDS[0], consistency={},
                        domain_xml="<domain/>", disks=disks)

    luks = {"format": "luks", "key_id": OLD_ID, "salt": SALT}
    assert volume_record([manifest(None)]) is None
    record = volume_record([manifest(luks, None, luks)])
    assert record is not None and (record.salt, record.key_id) == (SALT, OLD_ID)
    for other in ({**luks, "key_id": NEW_ID}, {**luks, "salt": "ff" * 16},
                  {**luks, "salt": "../x"}):
        with pytest.raises(RepositoryError, match="nothing is changed"):
            volume_record([manifest(luks, other)] if other["salt"] != "../x" else
                          [manifest(other)])


def test_qemu_amends_the_luks_header_of_a_window_node(
        tmp_path: Path, keys: dict[str, Path]) -> None:  # noqa: F811
    data = _layer(tmp_path, keys["old"], 0)
    image = tmp_path / "volume.img"
    image.write_bytes(bytes(REGION) + data)  # the layer at 8 MiB of a file
    luks = layers.luks_region(data[:layers.HEADER_READ], len(data))
    assert luks is not None
    node = {"driver": "raw", "offset": REGION + luks[0], "size": luks[1],
            "file": layers.file_node(str(image))}
    old, new = str(keys["old"]), str(keys["new"])
    assert luks_slots.opens_with(node, old, new, new=False)
    assert not luks_slots.opens_with(node, old, new, new=True)
    assert luks_slots.add_key(node, old, new)
    luks_slots.remove_key(node, old, new)
    luks_slots.remove_key(node, old, new)  # none left: nothing to do
    assert not luks_slots.add_key(node, old, new)  # the old key opens nothing
    assert luks_slots.opens_with(node, old, new, new=True)
    assert not luks_slots.opens_with(node, old, new, new=False)
    after = image.read_bytes()[REGION:]
    start, end = luks[0], luks[0] + luks[1]
    assert after[:start] == data[:start] and after[end:] == data[end:]
    assert after[start:end] != data[start:end]
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(after)
    secret = secret_definition(new, "k")
    read = subprocess.run(["qemu-io", "-r", "--object", secret, "-c",
                           f"read -P {0x41} 0 65536",
                           layers.json_filename({"driver": "qcow2",
                                                 "file": layers.file_node(str(copy)),
                                                 "encrypt": layers.encrypt_options("k")})],
                          capture_output=True, text=True, check=False)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout


@pytest.mark.hostile
@pytest.mark.parametrize("where", ["free", "past-next-free"])
def test_a_layer_where_the_key_change_allocates_is_refused_before_anything_is_written(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]],
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    _vol, export, made = encrypted
    FakeSlots(export).install(monkeypatch)
    location = made[0].disks[0].location or {}
    layer = (int(location["offset"]), int(location["region"]))
    table = _table(export)
    entries = [{**e, "regions": [list(r) for r in subtract(map(tuple, e["regions"]), [layer])]}
               for e in table.entries]
    if where == "free":  # the table lists the first layer's region as free, owned by none
        hostile = replace(table, generation=table.generation + 1, entries=entries,
                          free=[layer])
        refusal = f"backup {made[0].backup_id}: .* does not own its bytes at {layer[0]}"
    else:  # the allocation pointer lies below the layer's region (its entry owns it)
        hostile = replace(table, generation=table.generation + 1, free=[],
                          next_free=layer[0])
        refusal = "where the key change writes"
    assert space_problem(hostile, 64 << 20) is None  # a table that passes the free list check
    vol = volume(export)
    vol._write_superblock(hostile)
    before = bytes(export.data[layer[0]:layer[0] + layer[1]])
    with pytest.raises(DamagedBackupError, match=refusal):
        _rekey(volume(export))
    assert bytes(export.data[layer[0]:layer[0] + layer[1]]) == before
    assert _table(export).rekey is None


class _ManyLayers:
    """A volume's calls ``open_layers`` makes, every region holding ``head`` (the first
    bytes of a real LUKS layer): as many layers as a table of contents may list."""

    def __init__(self, head: bytes) -> None:
        self.head, self.size = head, 1 << 50
        self.superblock = Superblock("abc123", next_free=1 << 49)

    def read(self, _offset: int, length: int) -> bytes:
        return self.head[:length]

    def allocatable(self) -> list[tuple[int, int]]:
        return []


@pytest.mark.hostile
def test_the_windows_of_many_layers_are_checked_in_one_sweep(layer_bytes: list[bytes]) -> None:
    count, region = 10_000, 4 << 20
    base = DiskRecord(disk=vdb(), size=DISK, data_file="vdb.qcow2", format="qcow2",
                      digest=Digest("sha256", "0" * 64), level="full", data_path="qemu",
                      bytes_transferred=0, stored_bytes=0,
                      encryption={"format": "luks", "key_id": OLD_ID, "salt": SALT})
    disks = [replace(base, disk=replace(vdb(), target=f"vd{n}"),
                     location={"offset": DATA_START + n * region, "region": region,
                               "length": len(layer_bytes[0])}) for n in range(count)]
    manifest = Manifest(backup_id=IDS[0], domain_uuid=UUID, domain_name="vm", level="full",
                        created=IDS[0], completed=IDS[0], consistency={},
                        domain_xml="<domain/>", disks=disks)
    vol = _ManyLayers(layer_bytes[0][:layers.HEADER_READ])
    started = time.monotonic()
    found = open_layers(cast(NbdVolume, vol), Scan([manifest], []))
    assert len(found) == count and time.monotonic() - started < 20
    # the last layer in the region of the first: still found, and named
    clash = replace(disks[-1], location={**(disks[0].location or {})})
    with pytest.raises(DamagedBackupError, match="disk vd0: vdb.qcow2 has its LUKS header"):
        open_layers(cast(NbdVolume, vol), Scan([replace(manifest, disks=[*disks[:-1], clash])],
                                              []))
    clash = replace(disks[-1], location={**(disks[-2].location or {}), "offset": DATA_START
                                         + (count - 2) * region + (1 << 20)})
    with pytest.raises(DamagedBackupError, match="has its LUKS header"):
        open_layers(cast(NbdVolume, vol), Scan([replace(manifest, disks=[*disks[:-1], clash])],
                                              []))


@pytest.mark.hostile
def test_a_layer_the_table_gives_to_another_backup_is_not_freed_by_the_key_change(
        encrypted: tuple[NbdVolume, MemoryExport, list[Manifest]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    vol, export, made = encrypted
    FakeSlots(export).install(monkeypatch)
    vol.take_lease()  # a plain backup of another disk beside the encrypted ones
    offset = vol.allocate(REGION)
    export.pwrite(b"plain data" * 1000, offset)
    record = replace(made[0].disks[0], disk=replace(vdb(), target="vdc"), encryption=None,
                     location={"offset": offset, "region": REGION, "length": 10_000},
                     digest=Digest("sha256", hashlib.sha256(export.pread(10_000, offset))
                                   .hexdigest()))
    vol.publish(Manifest(backup_id=IDS[2], domain_uuid=UUID, domain_name="vm", level="full",
                         created=IDS[2], completed=IDS[2], consistency={},
                         domain_xml="<domain/>", disks=[record]))
    # the table gives the plain layer's region to the first (encrypted) backup's entry
    table = _table(export)
    plain = (offset, REGION)
    entries = [{**e, "regions": [list(r) for r in (
        [*map(tuple, e["regions"]), plain] if e["backup_id"] == made[0].backup_id else
        subtract(map(tuple, e["regions"]), [plain]))]} for e in table.entries]
    hostile = replace(table, generation=table.generation + 1, entries=entries)
    assert space_problem(hostile, 64 << 20) is None
    vol._write_superblock(hostile)
    before = export.pread(REGION, offset)
    with pytest.raises(DamagedBackupError, match=f"backup {IDS[2]}: .* does not own its "
                       f"bytes at {offset}"):
        _rekey(volume(export))
    assert export.pread(REGION, offset) == before
    assert isinstance(export, TrimExport) and not overlap(export.trims, [plain])
    assert _table(export).rekey is None
