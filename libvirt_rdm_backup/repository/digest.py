"""Digests of stored data files, read in large buffers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

ALGORITHM = "sha256"
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
        if algorithm not in hashlib.algorithms_guaranteed:
            raise ValueError(f"unknown digest algorithm {algorithm!r}")
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
