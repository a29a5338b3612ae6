"""One encrypted layer of a ``rekey``, opened once and checked through that descriptor.

A layer's path is opened without following a symlink; the descriptor must be a regular
file with one link, on the repository's file system. Its header, its digests and what
QEMU changes (``/dev/fd/N``, :mod:`..qemu.luks_slots`) all go through that descriptor, so
a path swapped meanwhile changes nothing the key change reads or writes; once QEMU is
done, the path must still name the same file (:meth:`OpenLayer.check_same`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from libvirt_rdm_backup.engine.consolidate import backing_name
from libvirt_rdm_backup.errors import DamagedBackupError
from libvirt_rdm_backup.qemu import layers
from libvirt_rdm_backup.repository.digest import Digest, file_digests
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository


@dataclass(frozen=True)
class OpenLayer:
    """A checked layer: its descriptor, path and LUKS header region (offset, length)."""

    fd: int
    path: str
    region: tuple[int, int]
    manifest: Manifest
    record: DiskRecord

    def damaged(self, problem: str) -> DamagedBackupError:
        """The layer is damaged: ``problem`` says how."""
        return _damaged(self.manifest, self.record, problem)

    def digests(self) -> tuple[Digest, Digest]:
        """The digests of its whole file and of its body (outside the LUKS header)."""
        try:
            return file_digests(self.fd, self.region, self.record.digest.algorithm)
        except OSError as err:
            raise self.damaged(f"cannot be read: {err.strerror}") from None

    def check_same(self) -> None:
        """Its path still names the file of its descriptor (DamagedBackupError if not)."""
        held = os.fstat(self.fd)
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except OSError as err:
            raise self.damaged(f"cannot be found again: {err.strerror}") from None
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            raise self.damaged("was replaced by another file during the key change")


def _damaged(manifest: Manifest, record: DiskRecord, problem: str) -> DamagedBackupError:
    return DamagedBackupError(manifest.backup_id, f"{record.data_file} {problem}",
                              record.disk.target)


@contextmanager
def open_layer(repo: Repository, manifest: Manifest, record: DiskRecord
               ) -> Iterator[OpenLayer]:
    """The layer of ``record`` open for the block, once it is a regular file of the
    repository with a header this tool writes (with exactly the backing file its parent
    link implies) and a LUKS header where QEMU puts one; DamagedBackupError if not."""
    def damaged(problem: str) -> DamagedBackupError:
        return _damaged(manifest, record, problem)

    expected = backing_name(record.parent, record.disk.target)
    if record.backing_file is not None and record.backing_file != expected:
        raise damaged(f"is named with backing file {record.backing_file!r}, its parent link "
                      f"implies {expected!r}")
    path = repo.data_file(manifest, record)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise damaged(f"cannot be opened: {err.strerror}") from None
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode):
            raise damaged("is not a regular file")
        if held.st_nlink != 1:
            raise damaged(f"has {held.st_nlink} links, not one")
        if held.st_dev != os.stat(repo.root).st_dev:
            raise damaged("is on another file system than the repository")
        head = os.pread(fd, layers.HEADER_READ, 0)
        problem = layers.header_problem(head, expected, record.size, encrypted=True)
        region = layers.luks_region(head, held.st_size) if problem is None else None
        if region is None:
            raise damaged(problem or "has no LUKS header where QEMU puts one")
        yield OpenLayer(fd, path, region, manifest, record)
    finally:
        os.close(fd)
