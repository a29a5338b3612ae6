"""What the tests look at that the tool itself never asks: leftovers, installed hooks,
superblock slots, image and chunk-map comparisons."""

from __future__ import annotations

import os
import re
import subprocess

from libvirt_rdm_backup import hook
from libvirt_rdm_backup.fileutil import ATOMIC_TAG, PARTIAL_SUFFIX, STAGING_PREFIX
from libvirt_rdm_backup.repository.chunks import ChunkMap, differing, zero_digest
from libvirt_rdm_backup.targets.volume_format import Superblock

_UNFINISHED = re.compile(r"\..+(" + re.escape(ATOMIC_TAG) + r"[0-9a-f]{6}|\.[0-9]+@[0-9a-f]{8}"
                         r"\.[0-9a-f]{6}" + re.escape(PARTIAL_SUFFIX) + ")|"
                         + re.escape(STAGING_PREFIX) + r".+")


def is_unfinished(name: str) -> bool:
    """True for a name the tool gives what it is still writing (a temporary file of
    ``write_atomic`` or ``new_file_whole``, a repository's staging directory)."""
    return _UNFINISHED.fullmatch(name) is not None


def unfinished_under(root: str | os.PathLike[str]) -> list[str]:
    """Every path under ``root`` with a name of :func:`is_unfinished` (left by a killed run,
    or by one still going), sorted."""
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.join(directory, n) for n in (*dirs, *files) if is_unfinished(n)]
    return sorted(found)


def hook_installed(hooks_dir: str) -> bool:
    """Whether the tool's libvirt hook script is in place and executable."""
    path = hook.hook_path(hooks_dir)
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            head = stream.read(4096)
    except OSError:
        return False
    return hook.MARKER in head and os.access(path, os.X_OK)


def newest_superblock(slot_a: bytes, slot_b: bytes) -> Superblock | None:
    """The valid one of a volume's two superblock slots with the higher generation, or None."""
    valid = [s for s in map(Superblock.from_bytes, (slot_a, slot_b)) if s is not None]
    return max(valid, key=lambda s: s.generation) if valid else None


def images_equal(first: str, second: str, first_fmt: str, second_fmt: str) -> bool:
    """True when both images read identically (``qemu-img compare``)."""
    proc = subprocess.run(["qemu-img", "compare", "-q", "-f", first_fmt, "-F", second_fmt,
                           first, second], capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def changed_chunks(first: ChunkMap, second: ChunkMap) -> list[int]:
    """Indices of the chunks whose digest differs between two maps of one geometry."""
    assert (first.size, first.chunk_size, first.algorithm) == (
        second.size, second.chunk_size, second.algorithm)
    return list(differing(first.digests, second.digests, 0, first.count))


def is_zero_chunk(chunks: ChunkMap, index: int) -> bool:
    """True when chunk ``index`` of the map reads as zeros."""
    return chunks.digest(index) == zero_digest(chunks.chunk_length(index))
