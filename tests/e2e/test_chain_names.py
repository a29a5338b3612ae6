"""Chains whose names look alike keep their own dirty bitmaps and storage snapshots.

Chains ``daily``, ``daily-offsite`` and ``Daily`` back up one VM (a loop LUN ``vdb``
tracked by QEMU bitmaps, an iSCSI LUN ``sda`` by storage snapshots) in turns: each
chain's next backup is still an incremental on its own previous point, and every
point restores byte for byte. Snapshots named the way older versions named them are
still built on by the chain that made them, and never pruned by another chain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine.backup import BackupResult
from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.storage.clones import SNAPSHOT_DIR, clone_path
from libvirt_rdm_backup.storage.snapshots import scoped_prefix
from tests.faults.points import Points
from tools.labkit import LabVM, MiB, dirty_bitmaps, guest_write, lab_vm

pytestmark = pytest.mark.lab

CHAINS = ("daily", "daily-offsite", "Daily")


def clones(vm: LabVM) -> set[str]:
    directory = vm.iscsi_file.parent / SNAPSHOT_DIR
    return {n[: -len(".img")] for n in os.listdir(directory)} if directory.exists() else set()


def check_incremental(result: BackupResult, parent: BackupResult) -> None:
    for disk in ("vdb", "sda"):
        record = result.manifest.disk(disk)
        assert record is not None and record.level == "incremental", (result.manifest.chain,
                                                                      record)
        assert record.parent == parent.manifest.backup_id


def test_look_alike_chains_keep_each_others_tracking() -> None:
    with lab_vm(loop_size=32 * MiB, lun_size=32 * MiB, reflink=True) as vm:
        points = Points(vm, str(vm.workdir / "repo"))
        last = {}
        for chain in CHAINS:
            last[chain] = points.backup(chain=chain)
            assert last[chain].manifest.level == "full"
        for round_ in range(2):
            for index, chain in enumerate(CHAINS):
                guest_write(vm.dom, "vdb", 0x30 + round_ * 8 + index, index * MiB, MiB)
                guest_write(vm.dom, "sda", 0x50 + round_ * 8 + index, index * MiB, MiB)
                result = points.backup(chain=chain)
                check_incremental(result, last[chain])
                last[chain] = result
        live = dirty_bitmaps(vm.dom)
        kept = clones(vm)
        for chain in CHAINS:
            vdb, sda = last[chain].manifest.disk("vdb"), last[chain].manifest.disk("sda")
            assert vdb is not None and vdb.bitmap in live
            assert sda is not None and sda.storage_snapshot is not None
            assert sda.storage_snapshot["name"] in kept
        assert len(live & {m.disk("vdb").bitmap for m in  # type: ignore[union-attr]
                           (r.manifest for r in last.values())}) == len(CHAINS)
        assert points.restore_every_point() == 2 * 3 * len(CHAINS)


def test_snapshots_named_the_older_way_still_serve_their_chain() -> None:
    from libvirt_rdm_backup.storage.snapshots import legacy_prefix

    with lab_vm(loop_size=32 * MiB, lun_size=32 * MiB, reflink=True) as vm:
        repo = str(vm.workdir / "repo")
        points = Points(vm, repo)
        first = points.backup(disks=None)
        repo_id = Repository.open(repo).repo_id
        # rename the chain's snapshot the way older versions named it, in the manifest too
        path = Path(repo) / vm.uuid / first.manifest.backup_id / "manifest.json"
        data = json.loads(path.read_text())
        record = next(r for r in data["disks"] if r["disk"] == "sda")
        snap = record["storage_snapshot"]
        old = legacy_prefix(repo_id, "default", "sda") + snap["name"][-6:]
        os.rename(snap["handle"]["clone"], clone_path(str(vm.iscsi_file), old))
        snap["name"] = old
        snap["handle"].update(clone=clone_path(str(vm.iscsi_file), old),
                              target_iqn=f"{vm.iscsi.iqn}:{old}")
        path.write_text(json.dumps(data))
        # an older snapshot of chain "DEFAULT", whose older names start like those of
        # "default": a prune by the older prefix would take it
        twin = legacy_prefix(repo_id, "DEFAULT", "sda") + "0f0f0f"
        assert twin.startswith(legacy_prefix(repo_id, "default", "sda"))
        Path(clone_path(str(vm.iscsi_file), twin)).write_bytes(b"another chain's")

        guest_write(vm.dom, "sda", 0x71, 2 * MiB, MiB)
        second = points.backup()
        check_incremental(second, first)
        assert old in clones(vm) and twin in clones(vm)
        third = points.backup(level="full")  # the older point is superseded: deleted by name
        assert third.manifest.level == "full"
        assert old not in clones(vm) and twin in clones(vm)
        new = scoped_prefix(repo_id, "default", "sda") + third.manifest.backup_id[-6:]
        assert new in clones(vm)
        assert points.restore_every_point() == 2 * 3
        os.unlink(clone_path(str(vm.iscsi_file), twin))
