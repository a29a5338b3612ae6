"""Digests of stored data files, read in large buffers."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

ALGORITHM = "sha256"
# what a manifest may name: sha256 and stronger (never md5, sha1 or an unknown name)
ACCEPTED = frozenset({"sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512"})
_HEX = re.compile(r"[0-9a-f]+")
BUFFER = 8 * 1024 * 1024


@dataclass(frozen=True)
class Digest:
    """A named-algorithm digest (hex)."""

    algorithm: str
    value: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"algorithm": self.algorithm, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Digest:
        """Inverse of :meth:`to_dict`."""
        algorithm, value = str(data["algorithm"]), str(data["value"])
        if algorithm not in ACCEPTED:
            raise ValueError(f"digest algorithm {algorithm[:20]!r} is not accepted "
                             f"(only {', '.join(sorted(ACCEPTED))})")
        if len(value) != 2 * hashlib.new(algorithm).digest_size or not _HEX.fullmatch(value):
            raise ValueError(f"malformed {algorithm} digest")
        return cls(algorithm, value)


def file_digest(path: str, algorithm: str = ALGORITHM) -> Digest:
    """Digest of a whole file's bytes."""
    with open(path, "rb", buffering=0) as stream:
        hasher = hashlib.new(algorithm)
        view = memoryview(bytearray(BUFFER))
        while True:
            count = stream.readinto(view)
            if not count:
                break
            hasher.update(view[:count])
    return Digest(algorithm, hasher.hexdigest())


def file_digests(source: str | int, skip: tuple[int, int], algorithm: str = ALGORITHM
                 ) -> tuple[Digest, Digest]:
    """Digests of a whole file (a path, or an open descriptor read from its start and
    left open) and of its bytes outside ``skip`` (offset, length), in one read (the
    second one does not change when only that range of the file is rewritten)."""
    start, end = skip[0], skip[0] + skip[1]
    whole, outside = hashlib.new(algorithm), hashlib.new(algorithm)
    position = 0
    if isinstance(source, int):
        os.lseek(source, 0, os.SEEK_SET)
    with open(source, "rb", buffering=0, closefd=isinstance(source, str)) as stream:
        view = memoryview(bytearray(BUFFER))
        while count := stream.readinto(view):
            block = view[:count]
            whole.update(block)
            low, high = max(start - position, 0), min(end - position, count)
            if low >= high:
                outside.update(block)
            else:
                outside.update(block[:low])
                outside.update(block[high:])
            position += count
    return Digest(algorithm, whole.hexdigest()), Digest(algorithm, outside.hexdigest())
