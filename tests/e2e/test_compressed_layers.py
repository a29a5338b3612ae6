"""``backup --compress``: layers whose clusters QEMU wrote compressed, on the real lab.

The loop LUN and the iSCSI LUN hold text-like data. A full (the CLI, zstd), an
incremental (zstd) and a resync (zlib) are taken: the layers are qcow2 of that
compression type, the full stores far less than the data it holds, each point
restores byte-identical; verify is clean; a prune drops the incremental, its data
merged into the resync's layer, and the points kept still restore. The same in an NBD volume
(full, incremental and a resync compared with the last point read back from the volume).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.repository.retention import RetentionPolicy
from tests.lab.volume_server import VolumeServer
from tools.labkit import (
    LabVM,
    MiB,
    guest_write,
    lab_vm,
    rdm_backup,
    rdmb_tmpdir,
    same_bytes,
    snapshot_source,
)

pytestmark = pytest.mark.lab

LOOP_SIZE = 64 * MiB
LUN_SIZE = 32 * MiB
TEXT_LOOP = 40 * MiB
TEXT_LUN = 16 * MiB
BWLIMIT = 64  # MiB/s of a resync's reads (its disks hold about 56 MiB of data)


def text(length: int, seed: int) -> bytes:
    """Text-like bytes (log lines with counters), about 5 to 10 times compressible."""
    lines = []
    size, n = 0, 0
    while size < length:
        line = (f"{seed:04d}-{n:09d} host{n % 97:02d} sshd[{n * 7919 % 65521}]: accepted "
                f"publickey for user{n % 13} from 192.0.2.{n % 251} port {n * 31 % 60000}\n")
        lines.append(line)
        size += len(line)
        n += 1
    return "".join(lines).encode()[:length]


def write_text(path: str | Path, length: int, seed: int) -> None:
    with open(path, "r+b") as stream:
        stream.write(text(length, seed))
        stream.flush()
        os.fsync(stream.fileno())


def point(vm: LabVM, index: int) -> dict[str, Path]:
    """Raw copies of both raw disks as they are now (the guest held)."""
    vm.dom.suspend()
    try:
        return snapshot_source(vm, vm.workdir / f"ref-{index}")
    finally:
        vm.dom.resume()


def restore_and_compare(vm: LabVM, repo: str, backup_id: str, refs: dict[str, Path]) -> None:
    for disk, ref in refs.items():
        out = vm.workdir / f"restored-{disk}.raw"
        api.restore(vm.name, repo, disk, str(out), backup_id=backup_id)
        assert same_bytes(out, ref), f"{disk} of {backup_id} differs from its point in time"
        out.unlink()


def compression_type(repo: str, vm: LabVM, backup_id: str, disk: str) -> str:
    """The compression type in the header of a stored layer (``qemu-img info``)."""
    path = Path(repo) / vm.uuid / backup_id / f"{disk}.qcow2"
    done = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                          capture_output=True, text=True, check=True)
    return str(json.loads(done.stdout)["format-specific"]["data"]["compression-type"])


@pytest.fixture
def text_vm() -> LabVM:  # type: ignore[misc]
    with lab_vm(loop_size=LOOP_SIZE, lun_size=LUN_SIZE) as vm:
        write_text(vm.loop, TEXT_LOOP, 1)
        write_text(vm.iscsi_file, TEXT_LUN, 2)
        yield vm


def test_compressed_chain_restores_every_point(text_vm: LabVM,
                                               caplog: pytest.LogCaptureFixture) -> None:
    vm = text_vm
    repo = str(vm.workdir / "repo")
    refs = [point(vm, 0)]
    done = rdm_backup("backup", vm.name, "--target", repo, "--compress", "--json")
    assert done.returncode == 0, done.stderr
    full = json.loads(done.stdout)
    disks = {d["disk"]: d for d in full["disks"]}
    assert {d["compression"] for d in disks.values()} == {"zstd"}
    assert disks["vdb"]["data_path"] == "qemu" and disks["sda"]["data_path"] == "storage"
    # text-like data: the layers hold far less than the data they were given
    assert disks["vdb"]["stored_bytes"] < TEXT_LOOP // 3, disks["vdb"]
    assert disks["sda"]["stored_bytes"] < TEXT_LUN // 3, disks["sda"]
    assert compression_type(repo, vm, full["backup_id"], "vdb") == "zstd"

    for n in range(8):  # guest writes of repeated bytes: tracked by the bitmap
        guest_write(vm.dom, "vdb", 0x41 + n, (41 + 2 * n) * MiB, MiB)
    refs.append(point(vm, 1))
    inc = api.backup(vm.name, repo, level="incremental", compress="zstd")
    vdb = inc.manifest.disk("vdb")
    assert vdb is not None and vdb.level == "incremental" and vdb.compression == "zstd"
    assert vdb.stored_bytes < 2 * MiB  # 8 MiB of repeated bytes, compressed

    write_text(vm.loop, 4 * MiB, 3)  # under QEMU's feet: only a resync sees it
    refs.append(point(vm, 2))
    with caplog.at_level(logging.INFO, logger="libvirt_rdm_backup.engine.resync"):
        # --bwlimit: the resync's own reads of each disk paced to it
        resync = api.backup(vm.name, repo, level="resync", compress="zlib", bwlimit=BWLIMIT)
    vdb = resync.manifest.disk("vdb")
    assert vdb is not None and vdb.level == "resync" and vdb.compression == "zlib"
    resynced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resync")]
    assert any("vdb.qcow2" in m for m in resynced), resynced
    assert all(f"bytes read at most {BWLIMIT} MiB/s" in m for m in resynced), resynced
    assert compression_type(repo, vm, resync.manifest.backup_id, "vdb") == "zlib"

    ids = [full["backup_id"], inc.manifest.backup_id, resync.manifest.backup_id]
    for backup_id, ref in zip(ids, refs, strict=True):
        restore_and_compare(vm, repo, backup_id, ref)
    assert api.verify(repo).ok

    # the incremental is dropped (the full stays: differentials build on its bitmap), its
    # compressed data merged into the resync's layer
    api.prune(repo, RetentionPolicy(keep_last=1), vm.uuid)
    kept = [m.backup_id for m in api.list_backups(repo, vm.uuid)]
    assert kept == [ids[0], ids[2]]
    for backup_id, ref in zip(ids, refs, strict=True):
        if backup_id in kept:
            restore_and_compare(vm, repo, backup_id, ref)
    assert api.verify(repo).ok


def test_compressed_layers_in_an_nbd_volume(text_vm: LabVM) -> None:
    vm = text_vm
    with rdmb_tmpdir() as work:
        server = VolumeServer(work / "volume.img")
        server.start()
        try:
            refs = [point(vm, 0)]
            full = api.backup(vm.name, server.uri, compress="zstd")
            for n in range(4):
                guest_write(vm.dom, "vdb", 0x61 + n, (44 + 2 * n) * MiB, MiB)
            refs.append(point(vm, 1))
            inc = api.backup(vm.name, server.uri, level="incremental", compress="zstd")
            write_text(vm.loop, 4 * MiB, 3)  # under QEMU's feet: only a resync sees it
            refs.append(point(vm, 2))
            # compared with the incremental read back from the volume (no chunk maps there)
            resync = api.backup(vm.name, server.uri, level="resync", compress="zstd")
            vdb = resync.manifest.disk("vdb")
            assert vdb is not None and vdb.level == "resync" and "read back" in vdb.reason
            assert vdb.stored_bytes < 4 * MiB, vdb  # 4 MiB of text, compressed
            for result in (full, inc, resync):
                assert {d.compression for d in result.manifest.disks} == {"zstd"}
            stored = {d.disk.target: d.stored_bytes for d in full.manifest.disks}
            assert stored["vdb"] < TEXT_LOOP // 3 and stored["sda"] < TEXT_LUN // 3, stored
            for result, ref in zip((full, inc, resync), refs, strict=True):
                restore_and_compare(vm, server.uri, result.manifest.backup_id, ref)
            assert api.verify(server.uri).ok
        finally:
            server.stop()
