"""Resync layers: the chunks of a disk read over NBD that differ from its last backup.

:func:`resync_layer` reads an export once (a fleecing export of a running disk,
a storage snapshot or an offline device served by ``qemu-nbd``), compares
per-chunk digests with the last backup's :class:`ChunkMap` and writes only the
changed chunks into a new qcow2 layer on top of the previous point, through
``qemu-nbd``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from libvirt_rdm_backup.errors import OperationError, RepositoryError, StorageError
from libvirt_rdm_backup.pacing import Pacer, paced
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
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
from libvirt_rdm_backup.repository.chunks import (
    ALGORITHM,
    CHUNK,
    DIGEST_SIZE,
    ChunkMap,
    chunk_count,
    chunk_digest,
    differing,
    set_zero_range,
    zero_changes,
    zero_digest,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


def _hash_range(view: memoryview, start: int, stop: int) -> bytes:
    return b"".join(chunk_digest(view[k * CHUNK : (k + 1) * CHUNK]) for k in range(start, stop))


def _hash_piece(pool: ThreadPoolExecutor, workers: int, view: memoryview) -> bytes:
    """Digests of every chunk of ``view``, hashed by ``workers`` threads."""
    n = chunk_count(len(view))
    if workers <= 1 or n < 2 * workers:
        return _hash_range(view, 0, n)
    bounds = [n * i // workers for i in range(workers + 1)]
    return b"".join(pool.map(_hash_range, [view] * workers, bounds[:-1], bounds[1:]))


def chunk_aligned(ranges: Sequence[tuple[int, int]], size: int) -> Iterator[Segment]:
    """``(offset, length)`` byte ranges widened to whole chunks and merged, as data segments."""
    spans: list[list[int]] = []
    for offset, length in sorted(ranges):
        if length <= 0:
            continue
        start = offset // CHUNK * CHUNK
        end = min(-(-(offset + length) // CHUNK) * CHUNK, size)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        elif start < end:
            spans.append([start, end])
    for start, end in spans:
        yield start, end - start, False


def _resync(
    source: Any, writer: LayerWriter, size: int, parent: ChunkMap,
    progress: ProgressCallback | None,
    only: Sequence[tuple[int, int]] | None = None,
    pacer: Pacer | None = None,
) -> bytearray:
    """Read the source once (or only the ranges ``only``); write what differs from ``parent``.
    Reads of data are paced by ``pacer``, if any (``--bwlimit``).

    Returns the new digests: the parent's outside ``only``, freshly computed inside.
    """
    digests = bytearray(len(parent.digests)) if only is None else bytearray(parent.digests)
    if only is None:
        pieces = segments(source, size, has_allocation(source), CHUNK)
    else:
        pieces = chunk_aligned(only, size)
    if pacer is not None:  # one request (4 MiB, a whole number of chunks) at a time
        pieces = paced(pieces, pacer, REQUEST)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for offset, length, view in stream(source, pieces):
            first = offset // CHUNK
            stop = first + chunk_count(length)
            if view is None:
                set_zero_range(digests, size, first, stop)
                for index in zero_changes(parent.digests, size, first, stop):
                    writer.zero(index * CHUNK, min(CHUNK, size - index * CHUNK))
            else:
                digests[first * DIGEST_SIZE : stop * DIGEST_SIZE] = _hash_piece(
                    pool, workers, view
                )
                _write_changed(writer, view, first, stop, digests, parent, size)
            if progress is not None:
                progress(offset + length, size)
    writer.finish()
    return digests


def _write_changed(writer: LayerWriter, view: memoryview, first: int, stop: int,
                   digests: bytearray, parent: ChunkMap, size: int) -> None:
    """Write the chunks ``first``..``stop`` of ``view`` whose digests differ from the parent's
    (all-zero ones as zero requests, neighbours in one write)."""
    run: list[int] = []
    for index in differing(digests, parent.digests, first, stop):
        chunk_len = min(CHUNK, size - index * CHUNK)
        pos = index * DIGEST_SIZE
        if digests[pos : pos + DIGEST_SIZE] == zero_digest(chunk_len):
            writer.zero(index * CHUNK, chunk_len)
            continue
        if run and run[-1] + 1 != index:
            _write_run(writer, view, first, run, size)
            run = []
        run.append(index)
    if run:
        _write_run(writer, view, first, run, size)


def _write_run(writer: LayerWriter, view: memoryview, first: int, run: list[int],
               size: int) -> None:
    start = (run[0] - first) * CHUNK
    end = min((run[-1] + 1 - first) * CHUNK, size - first * CHUNK)
    writer.write(run[0] * CHUNK, view[start:end])


def create_layer(layer_path: str, backing_relpath: str, size: int,
                 layer_format: LayerFormat = PLAIN) -> None:
    """Create a new qcow2 layer (mode 0600) on top of ``backing_relpath`` (qcow2)."""
    if os.path.isabs(backing_relpath):
        raise RepositoryError(f"backing file {backing_relpath} must be relative to the layer")
    try:
        fd = os.open(layer_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise RepositoryError(f"cannot create layer {layer_path}: {err.strerror}") from err
    os.close(fd)
    try:
        img.create(layer_path, "qcow2", size, backing=backing_relpath,
                   options=layer_format.create_options())
    except BaseException:
        os.unlink(layer_path)
        raise


def _check_parent(parent_map: ChunkMap, size: int) -> None:
    if (parent_map.size, parent_map.chunk_size, parent_map.algorithm) != (
        size,
        CHUNK,
        ALGORITHM,
    ):
        raise RepositoryError(
            f"parent chunk map ({parent_map.size} bytes, {parent_map.chunk_size}-byte chunks) "
            f"does not fit a {size}-byte disk"
        )


def _into_layer(source: Any, layer_path: str, size: int, parent_map: ChunkMap,
                progress: ProgressCallback | None, only: Sequence[tuple[int, int]] | None,
                layer_format: LayerFormat, pacer: Pacer | None
                ) -> tuple[bytearray, LayerWriter]:
    """Serve the created layer with ``qemu-nbd`` and write the changed chunks into it."""
    # the layer alone, its backing file not opened: only whole clusters are
    # written (the last one up to the disk's end), so nothing is copied up
    layer_only = layers.json_filename(layer_format.writer(layers.file_chain([layer_path])))
    with qemu_nbd_server(layer_only, None, readonly=False) as layer_uri:
        target = connect_nbd(layer_uri)
        try:
            writer = LayerWriter(target)
            return _resync(source, writer, size, parent_map, progress, only, pacer), writer
        finally:
            disconnect_nbd(target)


def resync_layer(
    nbd_uri: str,
    size: int,
    parent_map: ChunkMap,
    layer_path: str,
    backing_relpath: str,
    progress: ProgressCallback | None = None,
    only: Sequence[tuple[int, int]] | None = None,
    layer_format: LayerFormat = PLAIN,
    speed: int = 0,
) -> tuple[ChunkMap, int]:
    """Write the chunks of the export ``nbd_uri`` that differ from ``parent_map`` as a new layer.

    The export is read once (zero extents that ``base:allocation`` reports are
    not read), or only the byte ranges ``only`` that the storage reported as
    changed, in pipelined 4 MiB requests; chunk digests are compared with
    ``parent_map``. ``layer_path`` is created as qcow2 backed by
    ``backing_relpath`` (relative to the layer's directory) and gets only the
    changed chunks: data through ``qemu-nbd``, chunks that became all-zero as
    NBD zero requests (zero clusters, no data); written as ``layer_format`` says
    (compressed clusters through a ``compress`` filter). ``speed``: the export's data read
    at most that many bytes/s on average (``--bwlimit``; 0: no limit). Returns the map of
    the export and the data bytes written. On failure the layer file is removed.
    """
    _check_parent(parent_map, size)
    started = time.monotonic()
    pacer = Pacer(speed) if speed > 0 else None
    source = None
    created = False
    try:
        source = connect_nbd(nbd_uri, allocation=True)
        exported = int(source.get_size())
        if exported != size:
            raise StorageError(f"{nbd_uri} has {exported} bytes, expected {size}")
        create_layer(layer_path, backing_relpath, size, layer_format)
        created = True
        digests, writer = _into_layer(source, layer_path, size, parent_map, progress, only,
                                      layer_format, pacer)
    except NbdError as err:
        if created:
            os.unlink(layer_path)
        raise OperationError(f"NBD I/O failed during resync of {layer_path}: {err}") from err
    except BaseException:
        if created:
            os.unlink(layer_path)
        raise
    finally:
        if source is not None:
            disconnect_nbd(source)
    log.info(
        "resync of %d bytes into %s: %d bytes written, %d zeroed, %.2f s%s",
        size, layer_path, writer.data_bytes, writer.zero_bytes, time.monotonic() - started,
        "" if pacer is None else f"; {pacer.describe()}",
    )
    return ChunkMap(size, CHUNK, ALGORITHM, digests), writer.data_bytes
