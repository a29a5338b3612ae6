"""Trust boundary: storage snapshot handles a repository's manifests name are checked first.

A manifest is rewritten so that the snapshot it keeps of the LUN ``sda`` (or of the loop
LUN ``vdb`` of a shut-off VM) names, as its clone, a file outside ``.rdmb-snapshots``; then
a symlink inside ``.rdmb-snapshots`` that points outside; then, as the target presenting
it, another live tgt target. The next backup touches none of them (nothing deleted,
nothing presented, nothing compared), warns naming the manifest and the disk, falls back
to a resync or full copy of the disk, and the backup after it is an incremental again.
Every point restores byte for byte, and restore and verify leave the victims alone too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.storage import tgt
from libvirt_rdm_backup.storage.clones import clone_path
from libvirt_rdm_backup.storage.snapshots import scoped_prefix
from tests.faults.points import Points
from tools.labkit import LabVM, MiB, guest_write, iscsi_target, lab_vm

pytestmark = [pytest.mark.lab, pytest.mark.hostile]

Handle = dict[str, Any]


def rewrite_sda_snapshots(vm: LabVM, repo: str, change: Callable[[Handle], None],
                          disk: str = "sda") -> list[str]:
    """Apply ``change`` to the ``disk`` storage snapshot of every manifest; their backup ids."""
    rewritten = []
    for manifest in api.list_backups(repo):
        path = Path(repo) / vm.uuid / manifest.backup_id / "manifest.json"
        data = json.loads(path.read_text())
        for record in data["disks"]:
            if record["disk"] == disk and record.get("storage_snapshot"):
                change(record["storage_snapshot"])
                rewritten.append(manifest.backup_id)
        path.write_text(json.dumps(data))
    assert rewritten
    return rewritten


def test_hostile_snapshot_handles_touch_nothing(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="libvirt_rdm_backup")
    victim = tmp_path / "victim.img"  # a file the tool must never delete or read
    victim.write_bytes(b"precious" * 4096)
    linked = tmp_path / "linked.img"
    linked.write_bytes(b"linked" * 4096)
    other_lun = tmp_path / "other-lun.img"
    other_lun.write_bytes(b"\0" * MiB)
    with lab_vm(loop_size=32 * MiB, lun_size=32 * MiB, reflink=True) as vm, \
            iscsi_target(other_lun) as other:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        symlink = Path()

        def untouched() -> None:
            assert victim.read_bytes() == b"precious" * 4096
            assert linked.read_bytes() == b"linked" * 4096
            if symlink != Path():
                assert symlink.is_symlink() and os.readlink(symlink) == str(linked)
            target = tgt.find_target(other.iqn)
            assert target is not None and target.tid == other.tid
            lun = target.lun(1)
            assert lun is not None and lun.backing_store_path == str(other_lun)

        guest_write(vm.dom, "sda", 0x41, 0, MiB)
        points.backup()
        repo_id = Repository.open(repo).repo_id
        name = scoped_prefix(repo_id, "default", "sda") + "5a5a5a"
        symlink = Path(clone_path(str(vm.iscsi_file), name))

        def outside(snap: Handle) -> None:
            snap["handle"]["clone"] = str(victim)

        def inside_symlink(snap: Handle) -> None:
            snap["name"] = name
            snap["handle"].update(clone=str(symlink), target_iqn=f"{vm.iscsi.iqn}:{name}")

        def other_target(snap: Handle) -> None:
            snap["handle"]["target_iqn"] = other.iqn

        os.symlink(linked, symlink)
        for round_, change in enumerate((outside, inside_symlink, other_target)):
            caplog.clear()
            rewritten = rewrite_sda_snapshots(vm, repo, change)
            guest_write(vm.dom, "sda", 0x50 + round_, (round_ + 1) * MiB, MiB)
            result = points.backup()
            untouched()
            sda = result.manifest.disk("sda")
            assert sda is not None and sda.level in ("full", "resync"), sda
            assert "not provably this disk's" in sda.reason
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            for backup_id in {rewritten[0], rewritten[-1]}:  # the kept points: full, newest
                assert any(backup_id in w and "sda" in w and "refused" in w for w in warnings), (
                    backup_id, warnings)

        guest_write(vm.dom, "sda", 0x60, 8 * MiB, MiB)
        last = points.backup()
        sda = last.manifest.disk("sda")
        assert sda is not None and sda.level == "incremental", sda  # on its own point again
        assert sda.parent == result.manifest.backup_id
        assert points.restore_every_point() == 2 * 5
        untouched()
        symlink.unlink()


def test_hostile_loop_clone_of_a_shut_off_vm_is_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="libvirt_rdm_backup")
    victim = tmp_path / "victim.img"
    victim.write_bytes(b"precious" * 4096)
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB, reflink=True, start=False) as vm:
        points = Points(vm, str(vm.workdir / "repo"))

        def host_write(pattern: int, offset: int) -> None:
            with open(vm.loop, "r+b") as stream:
                stream.seek(offset)
                stream.write(bytes([pattern]) * MiB)
                stream.flush()
                os.fsync(stream.fileno())

        host_write(0x21, 0)
        first = points.backup()
        vdb = first.manifest.disk("vdb")
        assert vdb is not None and vdb.storage_snapshot is not None
        assert vdb.storage_snapshot["agent"] == "loop-reflink"

        def outside(snap: Handle) -> None:
            snap["handle"]["clone"] = str(victim)

        rewritten = rewrite_sda_snapshots(vm, points.repo, outside, disk="vdb")
        host_write(0x22, 4 * MiB)
        second = points.backup()
        assert victim.read_bytes() == b"precious" * 4096
        vdb = second.manifest.disk("vdb")
        assert vdb is not None and vdb.level in ("full", "resync"), vdb
        assert any(rewritten[0] in r.getMessage() and "vdb" in r.getMessage()
                   for r in caplog.records if r.levelno >= logging.WARNING)
        host_write(0x23, 8 * MiB)
        third = points.backup()
        vdb = third.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "incremental" and vdb.bytes_transferred == MiB
        assert points.restore_every_point() == 2 * 3
        assert victim.read_bytes() == b"precious" * 4096
