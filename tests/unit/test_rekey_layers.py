"""``rekey`` on real LUKS layers (small qcow2 files made by qemu-img, no lab): a run cut
short after some key slots changed leaves a journal that other commands refuse and the
next run finishes; the layers then open with the new key only, hold their data, and
match their manifests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine import rekey as rekey_module
from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.errors import (
    CommandError,
    DamagedBackupError,
    OperationError,
    RepositoryError,
)
from libvirt_rdm_backup.qemu import img, layers, luks_slots
from libvirt_rdm_backup.qemu.layer_format import LayerFormat
from libvirt_rdm_backup.qemu.secrets import LayerKey, key_file, secret_definition
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.digest import file_digest, file_digests
from libvirt_rdm_backup.repository.encryption import EncryptionRecord, read_record, write_record
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.rekey_journal import MAC_LABEL, read_journal, write_journal
from libvirt_rdm_backup.repository.store import Repository
from tests.unit.test_repository_damage_units import IDS, SIZE, UUID, vdb

OLD, NEW = LayerKey(b"old key of the layers\n"), LayerKey(b"new key of the layers\n")
FAST = "10"  # ms of PBKDF2 per key slot here (the tool's 200 ms would make each open slow)


def _node(path: str) -> str:
    return layers.json_filename({"driver": "qcow2", "file": layers.file_node(path),
                                 "backing": None, "encrypt": layers.encrypt_options("k")})


def _qemu_io(path: str, key: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "--object", secret_definition(str(key), "k"), "-c",
                           command, _node(path)], capture_output=True, text=True, check=False)


def encrypted_repo(tmp_path: Path, keys: dict[str, Path], count: int = 2
                   ) -> tuple[Repository, list[str]]:
    """``count`` backups (a full, then incrementals) of one disk, each layer LUKS-encrypted
    with OLD and holding a pattern of its own; the repository's record names OLD."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    salt = secrets.token_bytes(16)
    record = EncryptionRecord(salt.hex(), OLD.key_id(salt))
    write_record(repo.root, record)
    paths = []
    for n, backup_id in enumerate(IDS[:count]):
        parent = IDS[n - 1] if n else None
        with repo.lock(UUID), repo.staging(UUID, backup_id) as staging:
            data = staging.file("vdb.qcow2")
            backing = f"../{parent}/vdb.qcow2" if parent else None
            with key_file(OLD) as secret, img.objects(secret_definition(secret)):
                options = LayerFormat(key_id=record.key_id).create_options()
                img.create(data, "qcow2", SIZE, backing,
                           {**options, "encrypt.iter-time": FAST})
            written = _qemu_io(data, keys["old"], f"write -P {0x41 + n} {n * 65536} 65536")
            assert written.returncode == 0, written.stderr
            size = Path(data).stat().st_size
            disk = DiskRecord(disk=vdb(), size=SIZE, data_file="vdb.qcow2", format="qcow2",
                              digest=file_digest(data), level="incremental" if n else "full",
                              data_path="qemu", bytes_transferred=65536, stored_bytes=size,
                              parent=parent, backing_file=backing, file_size=size,
                              encryption={"format": "luks", "key_id": record.key_id})
            repo.publish(staging, Manifest(
                backup_id=backup_id, domain_uuid=UUID, domain_name="vm", level=disk.level,
                created=backup_id, completed=backup_id, consistency={},
                domain_xml="<domain/>", disks=[disk], parent=parent))
        paths.append(str(Path(repo.backup_dir(UUID, backup_id)) / "vdb.qcow2"))
    return repo, paths


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setattr(luks_slots, "LUKS_ITER_TIME", int(FAST))
    found = {}
    for name, key in (("old", OLD), ("new", NEW)):
        found[name] = tmp_path / f"{name}-key"
        with open(found[name], "wb") as stream:
            key.write_to(stream.fileno())
    return found


@pytest.mark.fault
def test_a_rekey_cut_short_is_refused_by_others_and_finished_by_the_next(
        tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    repo, paths = encrypted_repo(tmp_path, keys)
    real_remove = luks_slots.remove_key
    calls: list[str] = []

    def remove_then_fail(path: str, old_path: str, new_path: str) -> None:
        calls.append(path)
        if len(calls) == 2:  # the second layer's old slot: the run "dies" here
            raise CommandError(["qemu-img"], 1, "killed")
        real_remove(path, old_path, new_path)

    monkeypatch.setattr(luks_slots, "remove_key", remove_then_fail)
    with pytest.raises(CommandError, match="run rekey again with the same two key files"):
        rekey_module.rekey(repo, OLD, NEW)
    assert (Path(repo.root) / ".rekey-journal.json").exists()
    for path in paths:  # every layer opens with a key at every step
        assert luks_slots.opens_with(path, str(keys["old"]), str(keys["new"]), new=True)
    with pytest.raises(OperationError, match="rekey again"):
        FileStore(repo, NEW)
    with pytest.raises(OperationError, match="rekey again"), FileStore(repo).reading(UUID):
        pass
    monkeypatch.setattr(luks_slots, "remove_key", real_remove)

    done = rekey_module.rekey(repo, OLD, NEW)
    assert (done.layers, done.backups, done.resumed) == (2, 2, True)
    assert not (Path(repo.root) / ".rekey-journal.json").exists()
    record = read_record(repo.root)
    assert record is not None and record.key_id == NEW.key_id(bytes.fromhex(record.salt))
    for n, path in enumerate(paths):
        assert not luks_slots.opens_with(path, str(keys["old"]), str(keys["new"]), new=False)
        read = _qemu_io(path, keys["new"], f"read -P {0x41 + n} {n * 65536} 65536")
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
        manifest = repo.load(UUID, IDS[n])
        disk = manifest.disks[0]
        assert disk.digest == file_digest(path) and disk.file_size == Path(path).stat().st_size
        assert disk.encryption == {"format": "luks", "key_id": record.key_id}
    store = FileStore(repo, NEW)
    with store.reading(UUID):
        pass
    assert all(store.damage(DiskPoint(m, m.disks[0]), digests=True) is None
               for m in repo.scan(UUID).backups)


@pytest.mark.hostile
def test_a_luks_region_where_qemu_does_not_put_one_is_refused(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    _repo, paths = encrypted_repo(tmp_path, keys, count=1)
    head, size = layers.read_head(paths[0]), Path(paths[0]).stat().st_size
    offset, length = layers.luks_region(head, size) or (0, 0)
    assert offset % 65536 == 0 and 0 < length <= 4 << 20
    assert layers.luks_region(head, offset + length - 1) is None  # past the end of the file
    l1_offset, rc_offset = struct.unpack_from(">QQ", head, 40)
    start = head.index(struct.pack(">II", layers.EXT_ENCRYPTION, 16)) + 8
    for bad in ((0, length), (offset + 512, length), (offset, 0), (offset, 1 << 40),
                (l1_offset, 65536), (rc_offset, 65536), (l1_offset - 65536, 2 * 65536),
                (rc_offset - 65536, 2 * 65536)):
        forged = head[:start] + struct.pack(">QQ", *bad) + head[start + 16:]
        assert layers.luks_region(forged, 1 << 40) is None, bad


def _cut_short(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rekey that dies before any key slot changed (its journal written)."""
    def fail(*_args: object) -> bool:
        raise CommandError(["qemu-img"], 1, "killed")

    with monkeypatch.context() as patch:
        patch.setattr(luks_slots, "add_key", fail)
        with pytest.raises(CommandError, match="rekey again"):
            rekey_module.rekey(repo, OLD, NEW)
    assert (Path(repo.root) / ".rekey-journal.json").exists()


@pytest.mark.hostile
def test_damage_after_a_rekey_cut_short_is_not_blessed_by_a_forged_journal(
        tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    repo, paths = encrypted_repo(tmp_path, keys)
    _cut_short(repo, monkeypatch)
    with open(paths[1], "r+b") as stream:  # a byte of its last (data) cluster changed
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last[0] ^ 0xFF]))
    region = layers.luks_region(layers.read_head(paths[1]), Path(paths[1]).stat().st_size)
    assert region is not None
    body = file_digests(paths[1], region)[1]
    journal = read_journal(repo.root)
    assert journal is not None
    journal_file = Path(repo.root) / ".rekey-journal.json"
    document = json.loads(journal_file.read_text())
    document["layers"][1]["body"] = body.to_dict()
    journal_file.write_text(json.dumps(document))
    with pytest.raises(RepositoryError, match="its mac does not match"):
        rekey_module.rekey(repo, OLD, NEW)
    # the journal signed with both keys names the body as it was: the damage is refused
    write_journal(repo.root, journal, LayerKey.pair_key(OLD, NEW, MAC_LABEL))
    manifest = (Path(repo.backup_dir(UUID, IDS[1])) / "manifest.json").read_bytes()
    with pytest.raises(DamagedBackupError, match="sha256 mismatch; the key was not changed"):
        rekey_module.rekey(repo, OLD, NEW)
    assert (Path(repo.backup_dir(UUID, IDS[1])) / "manifest.json").read_bytes() == manifest
    assert not luks_slots.opens_with(paths[1], str(keys["old"]), str(keys["new"]), new=True)


@pytest.mark.hostile
def test_a_layer_linked_or_swapped_for_a_symlink_is_not_what_qemu_changes(
        tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    repo, paths = encrypted_repo(tmp_path, keys, count=1)
    os.link(paths[0], tmp_path / "other-name.qcow2")
    with pytest.raises(DamagedBackupError, match="has 2 links, not one"):
        rekey_module.rekey(repo, OLD, NEW)
    assert not (Path(repo.root) / ".rekey-journal.json").exists()
    os.unlink(tmp_path / "other-name.qcow2")
    decoy = tmp_path / "decoy.qcow2"
    shutil.copyfile(paths[0], decoy)
    before = decoy.read_bytes()
    real_add = luks_slots.add_key

    def swap_then_add(layer: luks_slots.Layer, old_path: str, new_path: str) -> bool:
        os.rename(paths[0], tmp_path / "moved.qcow2")
        os.symlink(decoy, paths[0])
        return real_add(layer, old_path, new_path)

    monkeypatch.setattr(luks_slots, "add_key", swap_then_add)
    with pytest.raises(DamagedBackupError, match="replaced by another file"):
        rekey_module.rekey(repo, OLD, NEW)
    assert decoy.read_bytes() == before  # QEMU changed the checked file, not the symlink's
    moved = str(tmp_path / "moved.qcow2")
    assert luks_slots.opens_with(moved, str(keys["old"]), str(keys["new"]), new=True)


def _torn_slot(path: str) -> None:
    """Random bytes over the key material of the layer's first inactive LUKS key slot, as
    ``qemu-img amend`` killed between a new slot's material and the header enabling it."""
    region = layers.luks_region(layers.read_head(path), Path(path).stat().st_size)
    assert region is not None
    with open(path, "r+b") as stream:
        stream.seek(region[0])
        phdr = stream.read(592)
        assert phdr[:6] == b"LUKS\xba\xbe"
        key_bytes = struct.unpack_from(">I", phdr, 108)[0]
        slots = [struct.unpack_from(">I4x32xII", phdr, 208 + 48 * n) for n in range(8)]
        active, sector, stripes = next(s for s in slots if s[0] == 0x0000DEAD)
        start, length = region[0] + sector * 512, key_bytes * stripes
        assert region[0] + 592 <= start and start + length <= region[0] + region[1]
        stream.seek(start)
        stream.write(secrets.token_bytes(length))


@pytest.mark.fault
@pytest.mark.parametrize("damaged", [False, True], ids=["torn-slot", "and-data-changed"])
def test_a_rekey_killed_mid_slot_is_finished_and_damage_still_refused(
        tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        damaged: bool) -> None:
    repo, paths = encrypted_repo(tmp_path, keys)
    _cut_short(repo, monkeypatch)
    _torn_slot(paths[1])
    assert file_digest(paths[1]) != repo.load(UUID, IDS[1]).disks[0].digest
    assert luks_slots.opens_with(paths[1], str(keys["old"]), str(keys["new"]), new=False)
    if damaged:  # a byte of its last (data) cluster changed too
        with open(paths[1], "r+b") as stream:
            stream.seek(-1, os.SEEK_END)
            last = stream.read(1)
            stream.seek(-1, os.SEEK_END)
            stream.write(bytes([last[0] ^ 0xFF]))
        manifest = (Path(repo.backup_dir(UUID, IDS[1])) / "manifest.json").read_bytes()
        with pytest.raises(DamagedBackupError, match="sha256 mismatch; the key was not"):
            rekey_module.rekey(repo, OLD, NEW)
        assert (Path(repo.backup_dir(UUID, IDS[1])) / "manifest.json").read_bytes() == manifest
        assert not luks_slots.opens_with(paths[1], str(keys["old"]), str(keys["new"]), True)
        assert (Path(repo.root) / ".rekey-journal.json").exists()
        return
    done = rekey_module.rekey(repo, OLD, NEW)
    assert (done.layers, done.resumed) == (2, True)
    assert not (Path(repo.root) / ".rekey-journal.json").exists()
    for n, path in enumerate(paths):
        assert not luks_slots.opens_with(path, str(keys["old"]), str(keys["new"]), new=False)
        read = _qemu_io(path, keys["new"], f"read -P {0x41 + n} {n * 65536} 65536")
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
        assert repo.load(UUID, IDS[n]).disks[0].digest == file_digest(path)
    store = FileStore(repo, NEW)
    assert all(store.damage(DiskPoint(m, m.disks[0]), digests=True) is None
               for m in repo.scan(UUID).backups)
