"""Space given back in a volume served by ``receive``: points dropped and a kept point's
layer moved in one publication, the served file shrinking, the freed regions reused."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.stores import open_store
from libvirt_rdm_backup.engine.volume_store import VolumeStore
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.uri import NbdAddress, parse_target
from libvirt_rdm_backup.targets.volume_space import normalize, overlap
from tests.e2e.test_nbd_target import reference, restore_compare, server
from tests.lab.volume_server import VolumeServer
from tools.labkit import LabVM, MiB, guest_write, lab_vm, rdm_backup

pytestmark = pytest.mark.lab
__all__ = ["server"]  # the fixture

CHANGED = 24 * MiB  # written between backups: what each layer holds


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def change(vm: LabVM, pattern: int) -> None:
    for piece in range(CHANGED // (8 * MiB)):
        guest_write(vm.dom, "vdb", pattern, (pattern % 4) * CHANGED + piece * 8 * MiB, 8 * MiB)


def table(uri: str) -> tuple[list[str], list[tuple[int, int]], dict[str, list[tuple[int, int]]]]:
    """The volume's listed backups, free list and each backup's regions, as read back."""
    address = parse_target(uri)
    assert isinstance(address, NbdAddress)
    volume = NbdVolume.open(address)
    try:
        block = volume.superblock
        owned = {e["backup_id"]: [(int(o), int(n)) for o, n in e["regions"]]
                 for e in block.entries}
        return [e["backup_id"] for e in block.entries], list(block.free), owned
    finally:
        volume.close()


def move_layer(store: VolumeStore, manifest: Manifest) -> Manifest:
    """The point's vdb layer copied into a new region (under the lease): its new manifest."""
    volume = store.volume
    record = manifest.disk("vdb")
    assert record is not None and record.location is not None
    old, length = int(record.location["offset"]), int(record.location["length"])
    new = volume.allocate(int(record.location["region"]))
    for start in range(0, length, 4 * MiB):
        count = min(4 * MiB, length - start)
        volume.write(new + start, bytes(volume.handle.pread(count, old + start)))
    volume.flush()
    moved = replace(record, location={**record.location, "offset": new})
    return replace(manifest, disks=[moved if d is record else d for d in manifest.disks])


def test_dropped_points_give_space_back_and_their_regions_are_reused(
        server: VolumeServer) -> None:
    with lab_vm(loop_size=128 * MiB) as vm:
        ids = []
        for index, level in enumerate(["full", "auto", "full", "auto"]):
            change(vm, 0x40 + index)
            if index == 2:
                refs2 = {"vdb": reference(vm, "2")["vdb"]}
            if index == 3:
                refs3 = {"vdb": reference(vm, "3")["vdb"]}
            done = api.backup(vm.name, server.uri, disks=["vdb"], level=level)
            ids.append(done.manifest.backup_id)
        assert api.list_backups(server.uri)[3].disk("vdb").parent == ids[2]  # type: ignore[union-attr]
        before = allocated(server.path)
        _listed, _free, owned_before = table(server.uri)

        with open_store(server.uri) as store, store.lock(vm.uuid):
            assert isinstance(store, VolumeStore)
            kept = next(m for m in store.scan(vm.uuid).backups if m.backup_id == ids[3])
            moved = move_layer(store, kept)
            report = store.publish_changes(vm.uuid, [moved], [ids[0], ids[1]])

        listed, free, owned = table(server.uri)
        assert listed == ids[2:]
        assert not overlap(free, [r for regions in owned.values() for r in regions])
        gone = [*owned_before[ids[0]], *owned_before[ids[1]]]
        old_layer = (int(kept.disk("vdb").location["offset"]),  # type: ignore[union-attr,index]
                     int(kept.disk("vdb").location["region"]))  # type: ignore[union-attr,index]
        assert normalize(overlap(free, [*gone, old_layer])) == normalize([*gone, old_layer])
        assert report.trimmed == report.free == sum(n for _o, n in free)
        after = allocated(server.path)
        assert before - after >= 2 * CHANGED - 4 * MiB, (before, after)

        assert rdm_backup("verify", "--target", server.uri).returncode == 0
        restore_compare(vm, server.uri, ids[2], refs2)
        restore_compare(vm, server.uri, ids[3], refs3)

        change(vm, 0x50)
        refs4 = {"vdb": reference(vm, "4")["vdb"]}
        again = api.backup(vm.name, server.uri, disks=["vdb"])
        record = again.manifest.disk("vdb")
        assert record is not None and record.parent == ids[3] and record.location is not None
        layer = [(int(record.location["offset"]), int(record.location["region"]))]
        assert overlap(layer, free) == layer  # the new layer went into a freed region
        restore_compare(vm, server.uri, again.manifest.backup_id, refs4)
        restore_compare(vm, server.uri, ids[3], refs3)
