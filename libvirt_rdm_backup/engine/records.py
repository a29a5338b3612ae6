"""The record of each disk a backup wrote: its layer described, digested and chunk-mapped.

The session describes and checks the written layer (:meth:`.sinks.Session.written`)
and reads its digest; the chunk map of a local plain layer is computed here, side by
side with the digest (both read the new data), and kept beside the layer. An encrypted
layer gets no chunk map: a map holds digests of the plain disk's chunks, in clear.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from libvirt_rdm_backup.engine.capture import Capture
from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.sinks import DATA_FORMAT, LocalLayer, Session, Written
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.repository.chunkmap import chunkmap_of_layer
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.storage.base import RawDiskMapping

MappingResult = tuple[RawDiskMapping | None, str | None]  # the mapping, or why there is none


def _chunk_map(plan: DiskPlan, local: LocalLayer, captured: Capture,
               parent_map: ChunkMap | None, extents: list[img.MapExtent]) -> ChunkMap | None:
    """The new point's chunk map: from the resync, or from the layer's own clusters."""
    if not _maps_layer(plan, captured, parent_map):
        return captured.chunk_maps.get(plan.disk.target)
    return chunkmap_of_layer(local.path, parent_map, int(plan.disk.size or 0), extents,
                             local.lower, take_parent=True)


def _maps_layer(plan: DiskPlan, captured: Capture, parent_map: ChunkMap | None) -> bool:
    """True when the new point's chunk map is computed from its layer (not from the
    resync, and not for a point whose parent has no map to build on)."""
    return plan.disk.target not in captured.chunk_maps and (
        plan.parent is None or parent_map is not None)


def _map_and_chunks(plan: DiskPlan, session: Session, written: Written, captured: Capture,
                    parent_map: ChunkMap | None
                    ) -> tuple[list[img.MapExtent], ChunkMap | None]:
    """The layer's allocation map and the new point's chunk map (None for an encrypted
    layer, whatever made it, and for a layer that is not a local file)."""
    extents = [] if written.own_bytes is not None else img.map_extents(written.image)
    local = written.local
    if local is None or session.layer_format.encrypted:
        return extents, None
    return extents, _chunk_map(plan, local, captured, parent_map, extents)


def _with_point_snapshot(mapping: RawDiskMapping | None, plan: DiskPlan,
                         captured: Capture) -> RawDiskMapping | None:
    """The mapping, its storage root naming the storage snapshot the point was read from."""
    snap = captured.snapshots.get(plan.disk.target)
    if mapping is not None and snap is not None:
        point = {"agent": snap.agent, "name": snap.name, "created": snap.created}
        if isinstance(snap.handle.get("snap_id"), int):
            point["snap_id"] = snap.handle["snap_id"]
        mapping.root.identity["point_snapshot"] = point
    return mapping


def record_disk(plan: DiskPlan, session: Session, captured: Capture, mapping: MappingResult,
                parent_map: ChunkMap | None) -> DiskRecord:
    """The record of the disk's new layer (``parent_map``: the chunk map of its parent,
    used up: its buffer becomes the new point's map)."""
    written = session.written(plan)
    with ThreadPoolExecutor(1) as pool:  # both read the new data: hash it side by side
        digest = pool.submit(session.digest, plan)
        extents, chunk_map = _map_and_chunks(plan, session, written, captured, parent_map)
        data_digest = digest.result()
    chunk_file = chunk_digest = None
    if chunk_map is not None and written.local is not None:
        chunk_map.save(written.local.chunk_map_path)
        chunk_file = os.path.basename(written.local.chunk_map_path)
        chunk_digest = file_digest(written.local.chunk_map_path)
    return DiskRecord(
        disk=plan.disk,
        format=DATA_FORMAT,
        level=plan.level,
        reason=plan.reason,
        data_path=str(plan.path),
        mapping=_with_point_snapshot(mapping[0], plan, captured),
        mapping_error=mapping[1],
        parent=plan.parent.backup_id if plan.parent else None,
        bitmap=captured.new_bitmaps.get(plan.disk.target),
        storage_snapshot=captured.snapshots[plan.disk.target].to_dict()
        if plan.disk.target in captured.snapshots else None,
        size=int(plan.disk.size or img.virtual_size(written.image)),
        data_file=written.data_file,
        digest=data_digest,
        bytes_transferred=written.own_bytes if written.own_bytes is not None
        else img.data_bytes(written.image, own_only=True, extents=extents),
        stored_bytes=written.stored_bytes,
        file_size=written.file_size,
        backing_file=written.backing_file,
        location=written.location,
        chunk_map=chunk_file,
        chunk_map_digest=chunk_digest,
        compression=session.layer_format.record(),
        encryption=session.layer_format.encryption(),
    )
