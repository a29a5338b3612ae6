"""Resyncs without a chunk map: the disk compared with its last point read back, on the real lab.

An NBD volume keeps no chunk maps: an encrypted full, an incremental, a forced resync that
also sees a write made under QEMU's feet (only a resync can), an incremental after it; a
plain volume's resync of a shut-off domain read from storage (with ``--bwlimit``: the disk's
reads paced to it); and a file repository (plain and encrypted) whose last point lost its
chunk map from its record (the plain resync then merged by a prune into the incremental built
on it), then a damaged layer of the point to read back (refused, exit 5). Every point
restores byte-identical, and a resync layer holds about the changed bytes only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.backup import BackupResult
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.repository.retention import RetentionPolicy
from tests.e2e.test_encrypted_layers import MARK, enc_vm, files_holding, point  # noqa: F401
from tests.e2e.test_nbd_target import server  # noqa: F401
from tests.lab.volume_server import VolumeServer
from tools.labkit import LabVM, MiB, guest_write, rdm_backup, same_bytes, snapshot_source

pytestmark = pytest.mark.lab

CHUNK = 64 * 1024
BWLIMIT = 16  # MiB/s
PACED = re.compile(rf"resync of disk (\w+) .* read back: .* ([\d.]+) s; (\d+) bytes read at "
                   rf"most {BWLIMIT} MiB/s \(([\d.]+) s waited\)")


def under_qemus_feet(vm: LabVM, offset: int, length: int, byte: int) -> None:
    """Write to the loop LUN beside QEMU: no dirty bitmap sees it."""
    with open(vm.loop, "r+b") as stream:
        stream.seek(offset)
        stream.write(bytes([byte]) * length)
        os.fsync(stream.fileno())


def vdb(result: BackupResult) -> DiskRecord:
    record = result.manifest.disk("vdb")
    assert isinstance(record, DiskRecord)
    return record


def vdb_ref(vm: LabVM, index: int) -> dict[str, Path]:
    """The reference of vdb alone as it is now."""
    return {"vdb": point(vm, index)["vdb"]}


def restores(vm: LabVM, target: str, points: list[tuple[str, dict[str, Path]]],
             key: Path | None = None) -> None:
    """Every point of every disk restores byte-identical to its reference."""
    for backup_id, refs in points:
        for disk, ref in refs.items():
            out = vm.workdir / f"out-{disk}.raw"
            api.restore(vm.name, target, disk, str(out), backup_id=backup_id,
                        encrypt_key_file=str(key) if key is not None else None)
            assert same_bytes(out, ref), f"{disk} of {backup_id}"
            out.unlink()


def test_encrypted_resync_in_an_nbd_volume(enc_vm: LabVM,  # noqa: F811
                                           server: VolumeServer) -> None:  # noqa: F811
    vm, target = enc_vm, server.uri
    key = vm.workdir / "key"
    key.write_bytes(b"k-" + secrets.token_hex(24).encode())
    def take(level: str) -> BackupResult:  # vdb only: each LUKS layer costs seconds
        return api.backup(vm.name, target, ["vdb"], level=level, encrypt_key_file=str(key))

    points = [(take("full").manifest.backup_id, vdb_ref(vm, 0))]
    guest_write(vm.dom, "vdb", 0x61, 14 * MiB, MiB)
    inc = take("incremental")
    points.append((inc.manifest.backup_id, vdb_ref(vm, 1)))

    under_qemus_feet(vm, 24 * MiB, MiB, 0x77)  # only a resync sees it
    guest_write(vm.dom, "vdb", 0x62, 20 * MiB, MiB)
    guest_write(vm.dom, "vdb", 0x00, 2 * MiB, MiB)  # text zeroed: zero clusters hide it
    resync = take("resync")
    points.append((resync.manifest.backup_id, vdb_ref(vm, 2)))
    record = vdb(resync)
    assert record.level == "resync" and record.parent == inc.manifest.backup_id
    assert f"differ from backup {inc.manifest.backup_id} read back" in record.reason
    assert record.chunk_map is None and record.encryption is not None
    # the two changed MiB of data (the zeroed one as zero clusters), not the disk's 12 MiB
    assert record.bytes_transferred <= 2 * MiB + 2 * CHUNK, record.bytes_transferred
    assert record.stored_bytes <= record.bytes_transferred + 4 * MiB, record.stored_bytes

    guest_write(vm.dom, "vdb", 0x63, 26 * MiB, MiB)  # tracking goes on from the resync
    after = take("incremental")
    assert vdb(after).level == "incremental" and vdb(after).parent == resync.manifest.backup_id
    points.append((after.manifest.backup_id, vdb_ref(vm, 3)))
    restores(vm, target, points, key)
    server.stop()
    assert files_holding(str(server.path.parent), MARK) == []


def test_resync_of_a_shut_off_domain_in_a_plain_nbd_volume(
        enc_vm: LabVM, server: VolumeServer) -> None:  # noqa: F811
    vm, target = enc_vm, server.uri
    points = [(api.backup(vm.name, target).manifest.backup_id, point(vm, 0))]
    vm.dom.destroy()
    under_qemus_feet(vm, 10 * MiB, 3 * CHUNK, 0x5C)
    # with --bwlimit: the disk's reads paced to it (a few seconds at most at this limit)
    done = rdm_backup("-v", "backup", vm.name, "--target", target, "--json",
                      "--bwlimit", str(BWLIMIT))
    assert done.returncode == 0, done.stderr
    (disk,) = [d for d in json.loads(done.stdout)["disks"] if d["disk"] == "vdb"]
    assert disk["level"] == "resync" and disk["data_path"] == "storage", disk
    assert "read back" in disk["reason"] and disk["bytes_transferred"] == 3 * CHUNK
    paced = PACED.findall(done.stderr)
    assert "vdb" in [name for name, *_ in paced], done.stderr
    for _name, seconds, read, _waited in paced:  # never ahead of the pace by over one piece
        assert int(read) <= BWLIMIT * MiB * float(seconds) + 4 * MiB, done.stderr
    points.append((json.loads(done.stdout)["backup_id"],
                   snapshot_source(vm, vm.workdir / "ref-off")))
    restores(vm, target, points)


def _drop_chunk_map(repo: Path, backup_id: str, disk: str) -> None:
    """The point's record names no chunk map any more, and its file is gone."""
    (path,) = repo.glob(f"*/{backup_id}/manifest.json")
    data = json.loads(path.read_text())
    for record in data["disks"]:
        if record["disk"] == disk:
            (path.parent / record.pop("chunk_map")).unlink()
            record.pop("chunk_map_digest")
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_file_repository_point_without_a_chunk_map_is_read_back(
        enc_vm: LabVM, encrypted: bool) -> None:  # noqa: F811
    vm = enc_vm
    repo = vm.workdir / "repo"
    key = vm.workdir / "key"
    key.write_bytes(b"k-" + secrets.token_hex(24).encode())
    given = str(key) if encrypted else None
    cli_key = ["--encrypt-key-file", str(key)] if encrypted else []

    def take(level: str) -> BackupResult:
        return api.backup(vm.name, str(repo), ["vdb"], level=level, encrypt_key_file=given)

    full = take("full")
    assert (vdb(full).chunk_map is None) == encrypted  # an encrypted point keeps no map
    assert (vdb(full).encryption is not None) == encrypted
    points = [(full.manifest.backup_id, vdb_ref(vm, 0))]
    if not encrypted:
        _drop_chunk_map(repo, full.manifest.backup_id, "vdb")
    under_qemus_feet(vm, 5 * MiB, MiB, 0x3A)
    resync = take("resync")
    record = vdb(resync)
    assert record.level == "resync" and "read back" in record.reason
    assert record.chunk_map is None  # built on a point without a map: none either
    assert record.bytes_transferred == MiB
    points.append((resync.manifest.backup_id, vdb_ref(vm, 1)))
    guest_write(vm.dom, "vdb", 0x3B, 7 * MiB, MiB)
    again = take("auto")  # tracking intact: an incremental, no map
    assert vdb(again).level == "incremental" and vdb(again).chunk_map is None
    points.append((again.manifest.backup_id, vdb_ref(vm, 2)))
    restores(vm, str(repo), points, key if encrypted else None)
    if encrypted:
        assert files_holding(str(repo), MARK) == []
    else:  # the resync dropped, its chunks merged into the incremental built on it
        api.prune(str(repo), RetentionPolicy(keep_last=1), vm.uuid)
        kept = [m.backup_id for m in api.list_backups(str(repo), vm.uuid)]
        assert kept == [full.manifest.backup_id, again.manifest.backup_id]
        restores(vm, str(repo), points[2:])

    # what is read back is checked first: a changed byte in the last point's layer makes the
    # resync fail (exit 5, one line naming it), nothing published
    (layer,) = repo.glob(f"*/{again.manifest.backup_id}/vdb.qcow2")
    with open(layer, "r+b") as stream:
        stream.seek(-100, os.SEEK_END)
        byte = stream.read(1)
        stream.seek(-100, os.SEEK_END)
        stream.write(bytes([byte[0] ^ 0xFF]))
    refused = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb",
                         "--level", "resync", *cli_key)
    assert refused.returncode == 5, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert again.manifest.backup_id in refused.stderr and "read back" in refused.stderr
    assert len(api.list_backups(str(repo), vm.uuid)) == (3 if encrypted else 2)
