"""Chunk digests and the chunk map file: the primitives of :mod:`chunkmap`.

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
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.fileutil import write_atomic

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
        try:  # read into one buffer that becomes the map's own: no second copy
            with open(path, "rb") as stream:
                length = os.fstat(stream.fileno()).st_size
                if length > limit:
                    raise RepositoryError(f"chunk map {path} is malformed: over {limit} bytes")
                data = bytearray(length)
                got = stream.readinto(data)
                if got != length or stream.read(1):
                    raise RepositoryError(f"chunk map {path} changed while it was read")
        except OSError as err:
            raise RepositoryError(f"cannot read chunk map {path}: {err.strerror}") from err
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, name: str = "chunk map") -> ChunkMap:
        """Parse the file format (see :meth:`load`); a ``bytearray`` becomes the map's own
        digest buffer (its header is cut off in place), so it must not be used after."""

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
        with memoryview(data)[fixed + head_len :] as body:  # no copy while checking
            if len(body) != count * DIGEST_SIZE:
                raise bad(f"{len(body)} digest bytes, expected {count * DIGEST_SIZE}")
            if hashlib.blake2b(body, digest_size=32).hexdigest() != header.get("body"):
                raise bad("digest bytes do not match the header's checksum")
        if isinstance(data, bytearray):
            del data[: fixed + head_len]  # CPython moves the start, not the bytes
            return cls(size, chunk_size, ALGORITHM, data)
        return cls(size, chunk_size, ALGORITHM, bytearray(data[fixed + head_len :]))


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
