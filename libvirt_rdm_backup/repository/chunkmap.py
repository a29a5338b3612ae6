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

File format (version 1), written atomically with mode 0600::

    b"RDMBCMAP"                       8 bytes magic
    header length                     4 bytes, big-endian
    header                            UTF-8 JSON object (see :meth:`ChunkMap.save`)
    digests                           count * 16 bytes, chunk 0 first
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup.errors import OperationError, RepositoryError
from libvirt_rdm_backup.fileutil import write_atomic
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.img import MapExtent

log = logging.getLogger(__name__)

CHUNK = 65536
DIGEST_SIZE = 16
ALGORITHM = "sha256-128"
FORMAT = "libvirt-rdm-backup/chunkmap"
VERSION = 1
MAGIC = b"RDMBCMAP"
MAX_HEADER = 64 * 1024
MAX_DIGEST_BYTES = 1 << 32  # the map of a 16 TiB disk: the most read without a known size
READ_SIZE = 8 * 1024 * 1024
COMPARE_BLOCK = 4096  # digests compared at once before looking at single chunks

_HEADER_LEN = struct.Struct(">I")


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one chunk's bytes (``update`` releases the GIL: threads can hash)."""
    hasher = hashlib.sha256()
    hasher.update(data)
    return hasher.digest()[:DIGEST_SIZE]


@functools.cache
def zero_digest(length: int = CHUNK) -> bytes:
    """The digest of ``length`` zero bytes (computed once per length)."""
    return chunk_digest(bytes(length))


ZERO_DIGEST = zero_digest(CHUNK)


def chunk_count(size: int, chunk_size: int = CHUNK) -> int:
    """Number of chunks of a disk of ``size`` bytes."""
    return -(-size // chunk_size)


def chunk_length(size: int, index: int, chunk_size: int = CHUNK) -> int:
    """Length of chunk ``index`` (the last one may be short)."""
    return min(chunk_size, size - index * chunk_size)


@dataclass(eq=True)
class ChunkMap:
    """The digests of every chunk of a disk of ``size`` bytes."""

    size: int
    chunk_size: int = CHUNK
    algorithm: str = ALGORITHM
    digests: bytes | bytearray = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.size < 0 or self.chunk_size <= 0:
            raise ValueError(f"bad chunk map geometry: size {self.size}, chunk {self.chunk_size}")
        expected = self.count * DIGEST_SIZE
        if len(self.digests) != expected:
            raise ValueError(f"chunk map needs {expected} digest bytes, got {len(self.digests)}")

    @classmethod
    def zero(cls, size: int, chunk_size: int = CHUNK) -> ChunkMap:
        """The map of an all-zero disk."""
        count = chunk_count(size, chunk_size)
        digests = bytearray(zero_digest(chunk_size) * count)
        if count and size % chunk_size:
            last = count - 1
            digests[last * DIGEST_SIZE :] = zero_digest(size - last * chunk_size)
        return cls(size, chunk_size, ALGORITHM, digests)

    @property
    def count(self) -> int:
        """Number of chunks."""
        return chunk_count(self.size, self.chunk_size)

    def digest(self, index: int) -> bytes:
        """The digest of chunk ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} out of range (0..{self.count - 1})")
        return bytes(self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    def chunk_length(self, index: int) -> int:
        """Length of chunk ``index``."""
        return chunk_length(self.size, index, self.chunk_size)

    def save(self, path: str) -> None:
        """Write the map to ``path`` atomically (temporary file, fsync, rename), mode 0600.

        The JSON header holds ``format``, ``version``, ``algorithm``,
        ``digest_size``, ``chunk_size``, ``size``, ``count`` and ``body``: the
        BLAKE2b-256 of the digest bytes, so that a damaged file is refused.
        """
        header = {
            "format": FORMAT,
            "version": VERSION,
            "algorithm": self.algorithm,
            "digest_size": DIGEST_SIZE,
            "chunk_size": self.chunk_size,
            "size": self.size,
            "count": self.count,
            "body": hashlib.blake2b(self.digests, digest_size=32).hexdigest(),
        }
        head = json.dumps(header, sort_keys=True).encode()
        try:  # the digests (16 MiB for a 64 GiB disk) written as they are, not copied
            write_atomic(path, (MAGIC + _HEADER_LEN.pack(len(head)) + head, self.digests))
        except OSError as err:
            raise RepositoryError(f"cannot write chunk map {path}: {err.strerror}") from err

    @classmethod
    def load(cls, path: str, size: int | None = None) -> ChunkMap:
        """Read a map written by :meth:`save`; RepositoryError on anything malformed.

        ``size``: the disk's size; at most the bytes a map of it has are read.
        """
        limit = len(MAGIC) + _HEADER_LEN.size + MAX_HEADER + (
            chunk_count(size) * DIGEST_SIZE if size is not None else MAX_DIGEST_BYTES)
        try:
            with open(path, "rb") as stream:
                data = stream.read(limit + 1)
        except OSError as err:
            raise RepositoryError(f"cannot read chunk map {path}: {err.strerror}") from err
        if len(data) > limit:
            raise RepositoryError(f"chunk map {path} is malformed: over {limit} bytes")
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "chunk map") -> ChunkMap:
        """Parse the file format (see :meth:`load`)."""

        def bad(reason: str) -> RepositoryError:
            return RepositoryError(f"chunk map {name} is malformed: {reason}")

        fixed = len(MAGIC) + _HEADER_LEN.size
        if len(data) < fixed or not data.startswith(MAGIC):
            raise bad("not a chunk map (bad magic)")
        (head_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
        if head_len > MAX_HEADER or fixed + head_len > len(data):
            raise bad("bad header length")
        try:
            header = json.loads(data[fixed : fixed + head_len].decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise bad("header is not JSON") from err
        if not isinstance(header, dict):
            raise bad("header is not an object")
        if header.get("format") != FORMAT:
            raise bad(f"format {header.get('format')!r}")
        if header.get("version") != VERSION:
            raise bad(f"unsupported version {header.get('version')!r}")
        if header.get("algorithm") != ALGORITHM or header.get("digest_size") != DIGEST_SIZE:
            raise bad(f"unsupported digest {header.get('algorithm')!r}")
        size, chunk_size, count = (_int(header, key) for key in ("size", "chunk_size", "count"))
        if size is None or chunk_size is None or count is None or size < 0 or chunk_size <= 0:
            raise bad("bad size, chunk_size or count")
        if count != chunk_count(size, chunk_size):
            raise bad(f"count {count} does not match size {size}")
        body = memoryview(data)[fixed + head_len :]  # no copy before the map's own
        if len(body) != count * DIGEST_SIZE:
            raise bad(f"{len(body)} digest bytes, expected {count * DIGEST_SIZE}")
        if hashlib.blake2b(body, digest_size=32).hexdigest() != header.get("body"):
            raise bad("digest bytes do not match the header's checksum")
        return cls(size, chunk_size, ALGORITHM, bytearray(body))


def _int(header: dict[str, Any], key: str) -> int | None:
    value = header.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def differing(
    first: bytes | bytearray, second: bytes | bytearray, start: int, stop: int
) -> Iterator[int]:
    """Chunk indices in [start, stop) whose digests differ; equal blocks are skipped whole."""
    a, b = memoryview(first), memoryview(second)
    for block in range(start, stop, COMPARE_BLOCK):
        end = min(block + COMPARE_BLOCK, stop)
        lo, hi = block * DIGEST_SIZE, end * DIGEST_SIZE
        if a[lo:hi] == b[lo:hi]:
            continue
        for index in range(block, end):
            pos = index * DIGEST_SIZE
            if a[pos : pos + DIGEST_SIZE] != b[pos : pos + DIGEST_SIZE]:
                yield index


def zero_changes(digests: bytes | bytearray, size: int, start: int, stop: int) -> Iterator[int]:
    """Chunks in [start, stop) whose digest in ``digests`` is not the zero digest."""
    count = chunk_count(size)
    last_short = size % CHUNK != 0 and stop == count
    full_stop = stop - 1 if last_short else stop
    zeros = ZERO_DIGEST * min(COMPARE_BLOCK, max(full_stop - start, 0))
    for block in range(start, full_stop, COMPARE_BLOCK):
        end = min(block + COMPARE_BLOCK, full_stop)
        lo, hi = block * DIGEST_SIZE, end * DIGEST_SIZE
        if memoryview(digests)[lo:hi] == memoryview(zeros)[: hi - lo]:
            continue
        for index in range(block, end):
            pos = index * DIGEST_SIZE
            if digests[pos : pos + DIGEST_SIZE] != ZERO_DIGEST:
                yield index
    if last_short and start < stop:
        last = count - 1
        if digests[last * DIGEST_SIZE :] != zero_digest(size - last * CHUNK):
            yield last


def set_zero_range(digests: bytearray, size: int, start: int, stop: int) -> None:
    """Set chunks [start, stop) of ``digests`` to the zero digest."""
    for block in range(start, stop, COMPARE_BLOCK):
        end = min(block + COMPARE_BLOCK, stop)
        digests[block * DIGEST_SIZE : end * DIGEST_SIZE] = ZERO_DIGEST * (end - block)
    count = chunk_count(size)
    if size % CHUNK and start < stop == count:
        digests[(count - 1) * DIGEST_SIZE :] = zero_digest(size - (count - 1) * CHUNK)


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
                      lower: Sequence[str] = ()) -> ChunkMap:
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
    """
    if parent is not None:
        if (parent.size, parent.chunk_size, parent.algorithm) != (size, CHUNK, ALGORITHM):
            raise RepositoryError(
                f"parent chunk map ({parent.size} bytes, {parent.chunk_size}-byte chunks, "
                f"{parent.algorithm}) does not fit a {size}-byte disk"
            )
        digests = bytearray(parent.digests)
    else:
        digests = bytearray(ChunkMap.zero(size).digests)
    if extents is None:
        extents = layer_map(path, lower)
    end = extents[-1].end if extents else 0
    if end != size:
        raise RepositoryError(f"layer {path} has {end} bytes, expected {size}")
    count = chunk_count(size)
    fallback: set[int] = set()
    reads: list[tuple[int, int, int]] = []  # (first chunk, chunk count, host offset)
    for ext in extents:
        first = -(-ext.start // CHUNK)
        stop = count if ext.end >= size else ext.end // CHUNK
        partial = {ext.start // CHUNK, max(ext.end - 1, ext.start) // CHUNK} - set(
            range(first, stop)
        )
        if ext.depth != 0 or not ext.present:
            if parent is None and ext.present:
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
            fallback.update(range(first, stop))  # compressed: no host offset
        else:
            raise RepositoryError(f"layer {path}: bytes {ext.start}..{ext.end} are neither "
                                  "zero nor data")
    _hash_layer_data(path, size, reads, digests)
    if fallback:
        log.info("reading %d chunks of %s through its chain", len(fallback), path)
        _hash_through_chain([path, *lower], size, sorted(fallback), digests)
    return ChunkMap(size, CHUNK, ALGORITHM, digests)


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
            for index in chunks:
                data = handle.pread(chunk_length(size, index), index * CHUNK)
                digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = chunk_digest(data)
        except NbdError as err:
            raise OperationError(f"cannot read {path} through qemu-nbd: {err}") from err
        finally:
            disconnect_nbd(handle)
