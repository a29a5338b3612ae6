"""Resyncs without a chunk map: the disk and its last point, read back, side by side.

A point without a chunk map (every point of an NBD volume; an encrypted point, or one
built on a point without a map, in a file repository) is read back through QEMU as a
restore reads it: its layers checked (headers, digests) and opened
(:meth:`.stores.Store.image_node`, backing files explicit, decrypted with the key), served
read-only by ``qemu-nbd``. The disk's export and that
export are read in the same pipelined 4 MiB pieces; what both report as zero
(``base:allocation``) is not read at all, a piece only one side reports as zero is read
on the other side only. Chunks (64 KiB) are compared byte by byte; the differing ones go
into the disk's new layer, created by the sink on top of the point (a qcow2 file in
staging, or a region of the volume) and written alone through ``qemu-nbd``: data as
writes, chunks that became all-zero as zero requests (zero clusters, which hide the
point's data). No chunk map is made: the new point has none either. With ``--bwlimit``
the reads of the disk's export (the production storage) are paced to it
(:class:`.pacing.Pacer`); the point's side is not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from itertools import tee
from typing import Any

from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.engine.verify import held_node, lineage_problem, opening_checker
from libvirt_rdm_backup.errors import DamagedBackupError, OperationError, StorageError
from libvirt_rdm_backup.modes import Level
from libvirt_rdm_backup.pacing import Pacer, paced
from libvirt_rdm_backup.qemu.layers import held_fds, json_filename
from libvirt_rdm_backup.qemu.nbd_io import (
    REQUEST,
    LayerWriter,
    NbdError,
    Segment,
    connect_nbd,
    disconnect_nbd,
    has_allocation,
    segments,
    stream,
)
from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server
from libvirt_rdm_backup.repository.chain import Chain
from libvirt_rdm_backup.repository.chunks import CHUNK

log = logging.getLogger(__name__)

ZERO = bytes(CHUNK)
Piece = tuple[int, int, bool, bool]  # (offset, length, zero on the disk, zero in the point)


def reads_back(plan: DiskPlan) -> bool:
    """True when the disk's resync compares with its last point read back (no chunk map)."""
    return plan.level is Level.RESYNC and plan.parent is not None \
        and not plan.parent.record.chunk_map


def parent_images(store: Store, chain: Chain, plans: list[DiskPlan]
                  ) -> dict[str, dict[str, Any]]:
    """Blockdev options of the points the resyncs without a chunk map read back, by disk.

    Every layer of such a point is checked as a restore checks it (header, digest of the
    stored data: what is read back decides what the new layer holds) before it is opened;
    an encrypted point is refused without its key. A file repository's layer is opened
    once and checked through that descriptor, which ``qemu-nbd`` inherits and opens
    (``/dev/fd/N``): the file read back is the one checked, whatever its path names
    meanwhile. Raises DamagedBackupError.
    """
    images: dict[str, dict[str, Any]] = {}
    files: dict[tuple[str, str], str] = {}  # the held layer files of a file repository
    check = opening_checker(store, files)
    for plan in plans:
        if not reads_back(plan):
            continue
        assert plan.parent is not None
        points, problem = lineage_problem(chain.backups, {}, plan.parent.manifest,
                                          plan.disk.target, check)
        if problem is not None:
            raise DamagedBackupError(plan.parent.backup_id, f"{problem}; it cannot be read "
                                     "back for a resync", plan.disk.target)
        images[plan.disk.target] = held_node(store, points, files)
    return images


def _merged(disk: Iterator[Segment], point: Iterator[Segment]) -> Iterator[Piece]:
    """The two partitions of [0, size) merged: pieces where neither side changes kind.
    What both sides report as zero is left out; the rest is cut into reads of at most
    :data:`REQUEST` bytes (chunk-aligned, as both partitions are)."""
    a, b = next(disk, None), next(point, None)
    pos = 0
    while a is not None and b is not None:
        end = min(a[0] + a[1], b[0] + b[1])
        if not (a[2] and b[2]):
            for start in range(pos, end, REQUEST):
                yield start, min(REQUEST, end - start), a[2], b[2]
        pos = end
        if a[0] + a[1] <= pos:
            a = next(disk, None)
        if b[0] + b[1] <= pos:
            b = next(point, None)


def _compare(writer: LayerWriter, offset: int, length: int,
             disk: memoryview | None, point: memoryview | None) -> None:
    """Write the chunks of one piece where the disk differs from the point (``None``:
    that side reads as zero there); neighbouring data chunks in one write."""
    run = -1  # start (within the piece) of the pending data run
    for start in range(0, length, CHUNK):
        n = min(CHUNK, length - start)
        new = ZERO[:n] if disk is None else bytes(disk[start:start + n])
        old = ZERO[:n] if point is None else bytes(point[start:start + n])
        changed = new != old
        if run >= 0 and (not changed or new == ZERO[:n]):
            assert disk is not None
            writer.write(offset + run, disk[run:start])
            run = -1
        if not changed:
            continue
        if new == ZERO[:n]:
            writer.zero(offset + start, n)
        elif run < 0:
            run = start
    if run >= 0:
        assert disk is not None
        writer.write(offset + run, disk[run:length])


def _compare_all(disk: Any, point: Any, writer: LayerWriter, size: int,
                 pacer: Pacer | None = None) -> None:
    """Read both exports once, side by side, and write what differs (the disk's reads
    paced by ``pacer``, if any)."""
    pieces = _merged(segments(disk, size, has_allocation(disk), CHUNK),
                     segments(point, size, has_allocation(point), CHUNK))
    mine, theirs = tee(pieces)
    disk_requests: Iterator[Segment] = ((o, n, dz) for o, n, dz, _pz in mine)
    if pacer is not None:
        disk_requests = paced(disk_requests, pacer)
    disk_reads = stream(disk, disk_requests)
    point_reads = stream(point, ((o, n, pz) for o, n, _dz, pz in theirs))
    for (offset, length, new), (_o, _n, old) in zip(disk_reads, point_reads, strict=True):
        _compare(writer, offset, length, new, old)
    writer.finish()


def _connected(uri: str, size: int, what: str) -> Any:
    handle = connect_nbd(uri, allocation=True)
    exported = int(handle.get_size())
    if exported != size:
        disconnect_nbd(handle)
        raise StorageError(f"{what} has {exported} bytes, expected {size}")
    return handle


def readback_layer(disk_uri: str, point_node: dict[str, Any], layer_node: dict[str, Any],
                   size: int, label: str, speed: int = 0) -> int:
    """Write the chunks of the export ``disk_uri`` that differ from the point
    ``point_node`` (blockdev options, read-only) into the created, empty layer
    ``layer_node`` (blockdev options of the layer alone, its backing not opened); the
    export read at most ``speed`` bytes/s on average (0: no limit).
    Returns the data bytes written."""
    started = time.monotonic()
    pacer = Pacer(speed) if speed > 0 else None
    handles: list[Any] = []
    try:
        with qemu_nbd_server(json_filename(point_node), None, readonly=True,
                             pass_fds=held_fds(point_node)) as point_uri, \
                qemu_nbd_server(json_filename(layer_node), None, readonly=False) as layer_uri:
            handles.append(_connected(disk_uri, size, f"the export of {label}"))
            handles.append(_connected(point_uri, size, f"the last point of {label}"))
            handles.append(connect_nbd(layer_uri))
            writer = LayerWriter(handles[2])
            _compare_all(handles[0], handles[1], writer, size, pacer)
            for handle in handles:
                disconnect_nbd(handle)
            handles = []
    except NbdError as err:
        raise OperationError(f"NBD I/O failed during the resync of {label}: {err}") from err
    finally:
        for handle in handles:
            disconnect_nbd(handle)
    log.info("resync of %s (%d bytes) against its last point read back: %d bytes written, "
             "%d zeroed, %.2f s%s", label, size, writer.data_bytes, writer.zero_bytes,
             time.monotonic() - started, "" if pacer is None else f"; {pacer.describe()}")
    return writer.data_bytes
