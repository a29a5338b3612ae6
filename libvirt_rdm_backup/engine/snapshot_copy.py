"""Copies of a disk from storage into its new layer: from the storage, or from a storage
snapshot, in full, as the ranges the storage reports as changed, or as a resync.

The ranges the storage reports as changed since the parent's snapshot are copied by a QEMU
backup job of a private storage daemon (:mod:`~..qemu.ranged_copy`) onto a target's image
that holds the parent's point (``rbd://``), into a new layer over a parent that has no chunk
map (an encrypted point), and, for an RBD snapshot, into the new qcow2 layer of a file
repository too when its ranges hold only written data or zeros
(:attr:`Presented.written_ranges`: an RBD image that is not a clone); the layer's chunk map
is then made from its clusters, as for a layer QEMU's bitmap filled. Other ranges may hold
unchanged data (file-system extents wider than the writes, objects a clone copied up from
its parent): into a file repository their chunks are read, compared with the parent's map
and stored only when they differ (:mod:`.resync`), as are all chunks of a snapshot when the
storage cannot tell what changed, or for a resync. A resync over a parent without a chunk
map compares the snapshot with the parent read back (:mod:`.readback`).
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.readback import readback_layer, reads_back
from libvirt_rdm_backup.engine.resync import resync_layer
from libvirt_rdm_backup.engine.sinks import Sink
from libvirt_rdm_backup.engine.storage_reads import raw_source_opts, rbd_endpoint, rbd_nbd
from libvirt_rdm_backup.qemu.block_copy import Endpoint, copy_image, raw_source
from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server
from libvirt_rdm_backup.qemu.ranged_copy import copy_ranges
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.storage.snapshot_agents import agent_by_name
from libvirt_rdm_backup.storage.snapshots import Presented, SnapshotAgent, StorageSnapshot

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


def copy_into(sink: Sink, plan: DiskPlan, source: dict[str, Any] | Endpoint, speed: int,
               progress: ProgressCallback | None, deadline: float | None = None) -> None:
    """Copy the raw ``source`` (blockdev options) into the disk's created layer, as a QEMU
    block job of a private storage daemon: sparse, rate-limited by ``speed`` (bytes/s)."""
    endpoint = source if isinstance(source, Endpoint) else Endpoint(source)
    copy_image(endpoint, sink.copy_target(plan), plan.disk.target, speed=speed,
               progress=progress, deadline=deadline)


def copy_snapshot(plan: DiskPlan, snap: StorageSnapshot, sink: Sink,
                  parent_maps: dict[str, ChunkMap], speed: int = 0,
                  progress: ProgressCallback | None = None,
                  parent_image: dict[str, Any] | None = None) -> ChunkMap | None:
    """Copy a disk from its storage snapshot: in full, the changed ranges, or a resync
    (compared with the parent's chunk map, or with ``parent_image``, the parent read back,
    where it has none); returns the chunk map of a resynced layer (None: no map made)."""
    assert plan.agent is not None and plan.disk.size is not None
    agent = agent_by_name(plan.agent)
    size = plan.disk.size
    try:
        presented = agent.present(plan.disk, snap)
        if plan.parent is None:
            sink.create(plan)
            copy_into(sink, plan, _snapshot_endpoint(plan, presented, size), speed, progress)
            return None
        if reads_back(plan):
            assert parent_image is not None
            sink.create(plan)
            with _snapshot_nbd(plan, presented, size) as uri:
                readback_layer(uri, parent_image, sink.copy_target(plan).node, size,
                               f"disk {plan.disk.target}", speed)
            return None
        if not sink.local_files or plan.disk.target not in parent_maps:
            # an image holding the parent's point, or a parent without a chunk map to
            # compare with: the changed ranges onto the new layer
            _copy_changed(plan, agent, presented, snap, sink, speed, progress)
            return None
        if plan.level != "resync" and presented.written_ranges:
            if _copy_written(plan, agent, presented, snap, sink, speed, progress):
                return None
        only = None
        if plan.level != "resync" and not presented.written_ranges:
            only = agent.changed_ranges(plan.disk, _older(plan), snap)
        if only is None and plan.level != "resync":
            log.info("disk %s: the storage cannot tell what changed; comparing digests",
                     plan.disk.target)
        with _snapshot_nbd(plan, presented, size) as uri:
            chunk_map, _written = resync_layer(
                uri, size, parent_maps[plan.disk.target], sink.target(plan),
                plan.parent.relative_data_file(), only=only, layer_format=sink.layer_format,
                speed=speed)
        return chunk_map
    finally:
        agent.withdraw(plan.disk, snap)


def _older(plan: DiskPlan) -> StorageSnapshot:
    """The storage snapshot of the plan's parent point."""
    assert plan.parent is not None and plan.parent.record.storage_snapshot is not None
    return StorageSnapshot.from_dict(plan.parent.record.storage_snapshot)


def _copy_written(plan: DiskPlan, agent: SnapshotAgent, presented: Presented,
                  snap: StorageSnapshot, sink: Sink, speed: int,
                  progress: ProgressCallback | None) -> bool:
    """Copy the ranges the storage reports as changed into the disk's new layer, no digests
    compared (they hold only written data, or zeros in both snapshots). The storage is asked
    while the layer is created and the daemon starts and opens both; False when it cannot
    tell (nothing copied, the layer removed again)."""
    assert plan.disk.size is not None
    with ThreadPoolExecutor(1) as pool:  # in a copy of this context: the key's secret in it
        ranges = pool.submit(contextvars.copy_context().run, agent.changed_ranges,
                             plan.disk, _older(plan), snap)
        sink.create(plan)
        copied = copy_ranges(_snapshot_endpoint(plan, presented, plan.disk.size),
                             sink.copy_target(plan), ranges.result, plan.disk.size,
                             plan.disk.target, speed=speed, chunk=sink.copy_chunk,
                             progress=progress)
    if not copied:
        os.unlink(sink.target(plan))
    return copied


def _snapshot_endpoint(plan: DiskPlan, presented: Presented, size: int) -> Endpoint:
    if presented.rbd is not None:
        return rbd_endpoint(presented.rbd, size, f"disk {plan.disk.target}")
    return Endpoint(raw_source(presented.source, presented.offset, size))


def _copy_changed(plan: DiskPlan, agent: SnapshotAgent, presented: Presented,
                  snap: StorageSnapshot, sink: Sink, speed: int,
                  progress: ProgressCallback | None) -> None:
    """Copy the ranges the storage reports as changed since the parent's snapshot onto the
    disk's target: an image that holds the parent's point or writes since it that are among
    these ranges, or a new layer over the parent's (every range when the storage cannot
    tell). The job writes whole clusters, zeros as zero clusters, so the layer's other
    clusters stay unallocated and read through the parent."""
    assert plan.parent is not None and plan.disk.size is not None
    size = plan.disk.size
    ranges = agent.changed_ranges(plan.disk, _older(plan), snap)
    if ranges is None:
        log.info("disk %s: the storage cannot tell what changed; copying all of it",
                 plan.disk.target)
    sink.create(plan)
    copy_ranges(_snapshot_endpoint(plan, presented, size), sink.copy_target(plan),
                [(0, size)] if ranges is None else ranges, size, plan.disk.target,
                speed=speed, chunk=sink.copy_chunk, progress=progress)


@contextmanager
def _snapshot_nbd(plan: DiskPlan, presented: Presented, size: int) -> Iterator[str]:
    """The presented snapshot served read-only over NBD; yields its URI."""
    if presented.rbd is not None:
        with rbd_nbd(presented.rbd, f"disk {plan.disk.target}") as uri:
            yield uri
        return
    opts = raw_source_opts(presented, size)
    with qemu_nbd_server(opts, None, readonly=True, extra=["--image-opts"]) as uri:
        yield uri
