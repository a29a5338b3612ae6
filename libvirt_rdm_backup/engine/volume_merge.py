"""Consolidation in an NBD volume: kept points' layers rewritten into fresh regions.

Each kept point whose layer builds on dropped points gets a new layer in a region of
its own: QEMU streams into it what the old layer reads above the next point kept (its
own data and the dropped layers' it does not hide). Nothing the table of contents lists
is written: the new manifests and the drops are published in one write of it
(:meth:`.volume_store.VolumeStore.publish_changes`), which frees the old regions. A
prune cut short before that leaves the volume as it was; the regions it took are
not reused (see docs/network.md).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from typing import Any, Protocol

from libvirt_rdm_backup.engine.consolidate import merged_manifest
from libvirt_rdm_backup.engine.merge_plan import PlannedMerge, find_merges
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.engine.sinks import NbdSink
from libvirt_rdm_backup.errors import DamagedBackupError
from libvirt_rdm_backup.modes import Level
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.layer_format import LayerFormat
from libvirt_rdm_backup.qemu.layer_jobs import stream_node
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint, lineage
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.prune_journal import Merge
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_changes import SpaceReport
from libvirt_rdm_backup.targets.volume_space import total

BASE_NODE = "rdmb-merge-base"


class _Volume(Protocol):
    """What of a volume store the merges use."""

    volume: NbdVolume

    def image_node(self, points: list[DiskPoint]) -> dict[str, Any]: ...

    def qemu_objects(self) -> tuple[dict[str, Any], ...]: ...

    def publish_changes(self, domain_uuid: str, replace: list[Manifest],
                        drop: list[str]) -> SpaceReport: ...


def consolidate_volume(store: _Volume, domain_uuid: str, chain: Chain, drop: set[str],
                       speed: int = 0) -> tuple[list[PlannedMerge], int]:
    """Drop ``drop``; the merges done and the bytes the volume gave back (on its free
    list, or past its allocation pointer)."""
    by_id = {m.backup_id: m for m in chain.backups}
    table = store.volume.superblock
    unused = total(table.free) - table.next_free  # free regions and the end left unused
    records: dict[str, list[DiskRecord]] = {}
    planned = []
    with tempfile.TemporaryDirectory(prefix="rdmb-prune-") as scratch:
        sink = NbdSink(store.volume, scratch)
        for merge in find_merges(chain, drop):
            record, moved = _merged(store, sink, by_id, chain, merge, speed)
            records.setdefault(merge.kept, []).append(record)
            planned.append(PlannedMerge(merge, moved, None))
        manifests = [merged_manifest(by_id[kept], found, drop, by_id)
                     for kept, found in records.items()]
        report = store.publish_changes(
            domain_uuid, [m for m in manifests if m is not None],
            [m.backup_id for m in chain.backups if m.backup_id in drop])
    return planned, max(0, report.free - report.next_free - unused)


def _merged(store: _Volume, sink: NbdSink, by_id: dict[str, Manifest], chain: Chain,
            merge: Merge, speed: int) -> tuple[DiskRecord, int]:
    """The kept layer of one merge written anew into a fresh region; its record and the
    bytes of data the new layer holds."""
    manifest = by_id[merge.kept]
    points, missing = lineage(chain.backups, manifest, merge.disk)
    if missing is not None:
        raise DamagedBackupError(merge.kept, f"builds on backup {missing}, which is missing",
                                 merge.disk)
    record = points[0].record
    plan = DiskPlan(replace(record.disk, size=record.size), DataPath.QEMU, Level.FULL,
                    "consolidated")
    sink.layer_format = LayerFormat.of_record(record.encryption)  # encrypted as it was
    sink.create(plan)
    top = sink.node(plan)
    top["backing"] = old = store.image_node(points)  # the old layers, headers pinned
    base = None
    if merge.base is not None:
        below = old
        for _ in range(1 + len(merge.dropped)):
            below = below["backing"]
        below["node-name"] = base = BASE_NODE
    stream_node(top, base, store.qemu_objects(), merge.disk, speed)
    img.forget_backing(layers.json_filename(sink.node(plan)))  # the store's --object given
    written = sink.written(plan)  # header read back and checked: no backing file
    moved = img.data_bytes(written.image, own_only=True)
    return replace(record, location=written.location, digest=sink.digest(plan),
                   stored_bytes=written.stored_bytes, parent=merge.base, backing_file=None,
                   compression=sink.layer_format.record(),
                   encryption=sink.layer_format.encryption(),
                   level="full" if merge.base is None else record.level), moved
