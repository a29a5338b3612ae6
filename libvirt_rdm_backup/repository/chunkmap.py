"""Per-chunk digest maps of a disk at one backup point.

A disk is cut into chunks of :data:`CHUNK` bytes (64 KiB, the cluster size of
our qcow2 layers); the last chunk is shorter when the disk size is not a
multiple of it. Each chunk has a 16-byte (128-bit) digest: the first 16 bytes
of the SHA-256 of the chunk's bytes (SHA-256 runs on the CPU's SHA instructions
where present, over twice as fast as BLAKE2b here), named :data:`ALGORITHM`.
128 bits keep the map small (16 bytes per 64 KiB, 256 MiB per TiB) and make an
accidental collision between two versions of a chunk negligible; the map detects
change, it does not authenticate data.

A :class:`ChunkMap` is kept beside every backup point. A resync after QEMU lost
its dirty bitmaps compares a fresh map of the disk with the last one and stores
only the chunks whose digest changed. :func:`chunkmap_of_layer` keeps the map
up to date at every backup at the cost of the data the new layer holds.

The map file and the digest primitives are :mod:`chunks`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from libvirt_rdm_backup.errors import OperationError, RepositoryError
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.img import MapExtent
from libvirt_rdm_backup.repository.chunks import (
    ALGORITHM,
    CHUNK,
    DIGEST_SIZE,
    READ_SIZE,
    ChunkMap,
    chunk_count,
    chunk_digest,
    chunk_length,
    set_zero_range,
)

log = logging.getLogger(__name__)


LayerExtent = MapExtent  # one extent of ``qemu-img map`` of a layer and its chain


def layer_map(path: str, lower: Sequence[str] = ()) -> list[LayerExtent]:
    """The allocation map of a qcow2 layer over the layers ``lower`` (depth 0 = the layer).

    The chain is exactly ``[path, *lower]``: no backing file named in a header is opened.
    """
    try:
        return img.map_extents(layers.json_filename(layers.file_chain([path, *lower])))
    except (ValueError, KeyError, TypeError) as err:
        raise OperationError(f"cannot parse qemu-img map output of {path}: {err}") from err


def chunkmap_of_layer(path: str, parent: ChunkMap | None, size: int,
                      extents: list[LayerExtent] | None = None,
                      lower: Sequence[str] = (), take_parent: bool = False) -> ChunkMap:
    """The chunk map of the disk as read through the qcow2 layer ``path`` over ``lower``.

    ``lower``: the layers below, top first, opened as given (their headers' backing
    file names are never followed); ``extents`` may map the layer alone.
    Only the layer's own clusters (depth 0 and present in ``qemu-img map``) are looked at:
    zero clusters get the zero digest, data clusters are read straight from the
    layer file at their host offset in reads of up to 8 MiB; every other chunk
    keeps ``parent``'s digest. With ``parent`` None (a full backup) a chunk that
    is not in the layer must be unallocated in the whole chain (it reads as
    zeros). Chunks the layer file cannot give alone (compressed clusters, or
    clusters not aligned to chunks) are read through the chain with qemu-nbd.
    ``take_parent``: update ``parent``'s digest buffer in place instead of a copy (the
    parent map must not be used afterwards; one map in memory instead of two).
    """
    digests = _first_digests(parent, size, take_parent)
    if extents is None:
        extents = layer_map(path, lower)
    _check_end(path, extents, size)
    reads, own, partial = _layer_reads(path, extents, parent is None, size, digests)
    _hash_layer_data(path, size, reads, digests)
    fallback = own | partial
    if fallback:
        log.info("reading %d chunks of %s through its chain", len(fallback), path)
        _hash_through_chain([path, *lower], size, sorted(fallback), digests)
    return ChunkMap(size, CHUNK, ALGORITHM, digests)


def _first_digests(parent: ChunkMap | None, size: int, take_parent: bool) -> bytearray:
    """The digests a new map starts from: the parent's (checked), or all-zero chunks."""
    if parent is None:
        return bytearray(ChunkMap.zero(size).digests)
    if (parent.size, parent.chunk_size, parent.algorithm) != (size, CHUNK, ALGORITHM):
        raise RepositoryError(
            f"parent chunk map ({parent.size} bytes, {parent.chunk_size}-byte chunks, "
            f"{parent.algorithm}) does not fit a {size}-byte disk"
        )
    return (parent.digests if take_parent and isinstance(parent.digests, bytearray)
            else bytearray(parent.digests))


def _check_end(path: str, extents: list[LayerExtent], size: int) -> None:
    end = extents[-1].end if extents else 0
    if end != size:
        raise RepositoryError(f"layer {path} has {end} bytes, expected {size}")


def _layer_reads(path: str, extents: list[LayerExtent], full: bool, size: int,
                 digests: bytearray) -> tuple[list[tuple[int, int, int]], set[int], set[int]]:
    """What to hash of a layer: (first chunk, chunk count, host offset) reads of its
    data; its own data chunks without a host offset (compressed); and the
    chunks it covers in part (read through its chain). Its zero clusters are set in
    ``digests`` at once. ``full``: the layer has no parent map."""
    count = chunk_count(size)
    own: set[int] = set()
    fallback: set[int] = set()
    reads: list[tuple[int, int, int]] = []  # (first chunk, chunk count, host offset)
    for ext in extents:
        first = -(-ext.start // CHUNK)
        stop = count if ext.end >= size else ext.end // CHUNK
        partial = {ext.start // CHUNK, max(ext.end - 1, ext.start) // CHUNK} - set(
            range(first, stop)
        )
        if ext.depth != 0 or not ext.present:
            if full and ext.present:
                raise RepositoryError(
                    f"layer {path} has no parent map, but bytes {ext.start}..{ext.end} "
                    "come from its backing chain"
                )
            continue
        fallback.update(partial)
        if first >= stop:
            continue
        if ext.zero:
            set_zero_range(digests, size, first, stop)
        elif ext.data and ext.offset is not None:
            reads.append((first, stop - first, ext.offset + (first * CHUNK - ext.start)))
        elif ext.data:
            own.update(range(first, stop))  # compressed: no host offset
        else:
            raise RepositoryError(f"layer {path}: bytes {ext.start}..{ext.end} are neither "
                                  "zero nor data")
    return reads, own, fallback - own


def _hash_layer_data(
    path: str, size: int, reads: Iterable[tuple[int, int, int]], digests: bytearray
) -> None:
    """Hash chunks read from the layer file at host offsets, in reads of READ_SIZE."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise RepositoryError(f"cannot read layer {path}: {err.strerror}") from err
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    per_read = READ_SIZE // CHUNK
    try:
        for first, number, host in reads:
            for done in range(0, number, per_read):
                index = first + done
                n = min(per_read, number - done)
                length = min(n * CHUNK, size - index * CHUNK)
                _pread_full(fd, view[:length], host + done * CHUNK, path)
                for k in range(n):
                    piece = view[k * CHUNK : min((k + 1) * CHUNK, length)]
                    pos = (index + k) * DIGEST_SIZE
                    digests[pos : pos + DIGEST_SIZE] = chunk_digest(piece)
    finally:
        os.close(fd)


def _pread_full(fd: int, view: memoryview, offset: int, path: str) -> None:
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as err:
            raise RepositoryError(f"cannot read layer {path}: {err.strerror}") from err
        if n == 0:
            raise RepositoryError(f"layer {path} is truncated at byte {offset + got}")
        got += n


def _hash_through_chain(chain: list[str], size: int, chunks: list[int],
                        digests: bytearray) -> None:
    """Hash chunks read through the layers ``chain`` (top first; qemu-nbd, read-only)."""
    from libvirt_rdm_backup.qemu.nbd_io import NbdError, connect_nbd, disconnect_nbd
    from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server

    path = chain[0]
    node = layers.json_filename(layers.file_chain(chain))
    with qemu_nbd_server(node, None, readonly=True) as uri:
        try:
            handle = connect_nbd(uri)
        except NbdError as err:
            raise OperationError(f"cannot read {path} through qemu-nbd: {err}") from err
        try:
            _hash_chunks(handle, size, chunks, digests)
        except NbdError as err:
            raise OperationError(f"cannot read {path} through qemu-nbd: {err}") from err
        finally:
            disconnect_nbd(handle)


def _hash_chunks(handle: Any, size: int, chunks: list[int], digests: bytearray) -> None:
    """Hash the sorted ``chunks`` read from an NBD export (raises NbdError)."""
    for first, count in _runs(chunks):  # consecutive chunks: one read of up to READ_SIZE
        end = min(size, (first + count) * CHUNK)
        data = memoryview(handle.pread(end - first * CHUNK, first * CHUNK))
        for index in range(first, first + count):
            piece = data[(index - first) * CHUNK:][:chunk_length(size, index)]
            digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = chunk_digest(piece)


def _runs(chunks: list[int], longest: int = READ_SIZE // CHUNK) -> list[tuple[int, int]]:
    """Sorted chunk indexes as (first, count) runs of consecutive ones, at most ``longest``."""
    runs: list[tuple[int, int]] = []
    for index in chunks:
        if runs and runs[-1][0] + runs[-1][1] == index and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
