"""Reflink clones and extent maps of files: FICLONE and FIEMAP through ``fcntl.ioctl``.

:func:`reflink_clone` makes a copy-on-write clone of a file on a filesystem that
shares extents (XFS with ``reflink=1``, btrfs). The clone takes metadata time
only; on XFS the kernel first writes back the source's dirty page cache, so the
clone holds every write that reached the source file before the call.

:func:`changed_between` compares the extent maps of two clones of one file: a
range mapped to the same physical blocks in both cannot differ (neither clone
is ever written), a range that reads as zero in both (hole or unwritten extent)
neither; everything else counts as changed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
from contextlib import suppress
from dataclasses import dataclass

from libvirt_rdm_backup.errors import StorageError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)

FIEMAP_FLAG_SYNC = 0x1

FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000

#: Extents whose physical address says nothing reliable about their content.
UNRELIABLE = (
    FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
)

_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
BATCH = 512  # extents asked for per FIEMAP call
_MAX_LENGTH = (1 << 64) - 1

FileExtent = tuple[int, int, int, int]  # (logical, physical, length, flags)


def reflink_clone(src: str, dst: str) -> None:
    """Clone ``src`` into the new file ``dst`` (mode 0600) sharing all its extents.

    Raises StorageError when ``dst`` exists, or when the filesystem cannot share
    extents; ``dst`` is then removed again.
    """
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise StorageError(f"cannot open {src}: {err.strerror}") from err
    try:
        try:
            dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StorageError(f"cannot create {dst}: {err.strerror}") from err
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        except BaseException as err:
            os.close(dst_fd)
            with suppress(OSError):
                os.unlink(dst)
            if isinstance(err, OSError):
                raise _clone_error(src, err) from err
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)


def _clone_error(src: str, err: OSError) -> StorageError:
    if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV):
        return StorageError(f"filesystem of {src} cannot share extents (reflink)")
    return StorageError(f"cannot clone {src}: {err.strerror}")


def supports_reflink(path: str) -> bool:
    """True when the filesystem holding ``path`` (a file or a directory) can clone files.

    Probes with an anonymous ``O_TMPFILE`` pair (a named temporary pair where
    ``O_TMPFILE`` is refused) in that directory; nothing is left behind.
    """
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    fds: list[int] = []
    try:
        src = _probe_file(directory)
        fds.append(src)
        os.pwrite(src, b"rdmb" * 1024, 0)
        dst = _probe_file(directory)
        fds.append(dst)
        fcntl.ioctl(dst, FICLONE, src)
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)


def _probe_file(directory: str) -> int:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, name = tempfile.mkstemp(prefix=".rdmb-reflink-probe-", dir=directory)
    os.unlink(name)
    return fd


def file_extents(path: str, start: int = 0, length: int | None = None,
                 sync: bool = True) -> list[FileExtent]:
    """The extents of ``path`` that overlap ``[start, start+length)`` (to EOF by default).

    Each is ``(logical, physical, length, flags)`` in bytes, as FIEMAP reports it
    (whole extents, possibly reaching outside the range). ``sync`` writes the
    file's dirty pages back first (``FIEMAP_FLAG_SYNC``), so that no delayed
    allocations remain. Raises StorageError when FIEMAP is not supported.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise StorageError(f"cannot open {path}: {err.strerror}") from err
    try:
        return _fiemap(fd, path, start, _MAX_LENGTH if length is None else length, sync)
    finally:
        os.close(fd)


def _fiemap(fd: int, path: str, start: int, length: int, sync: bool) -> list[FileExtent]:
    end = min(start + length, _MAX_LENGTH)
    flags = FIEMAP_FLAG_SYNC if sync else 0
    extents: list[FileExtent] = []
    buf = bytearray(_FIEMAP.size + BATCH * _EXTENT.size)
    pos = start
    while pos < end:
        _FIEMAP.pack_into(buf, 0, pos, end - pos, flags, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as err:
            raise StorageError(f"cannot map the extents of {path}: {err.strerror}") from err
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for index in range(mapped):
            fields = _EXTENT.unpack_from(buf, _FIEMAP.size + index * _EXTENT.size)
            extent = (fields[0], fields[1], fields[2], fields[5])
            extents.append(extent)
            last = last or bool(extent[3] & FIEMAP_EXTENT_LAST)
        logical, _physical, ext_len, _flags = extents[-1]
        if last or logical + ext_len <= pos:
            break
        pos = logical + ext_len
        flags = 0  # written back once is enough
    return extents


@dataclass(frozen=True)
class _Piece:
    """A clipped extent: ``[start, end)`` of the file, physical address at ``start``."""

    start: int
    end: int
    physical: int
    flags: int

    @property
    def zero(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN) and not self.flags & UNRELIABLE


def _pieces(extents: list[FileExtent], start: int, end: int) -> list[_Piece]:
    pieces: list[_Piece] = []
    for logical, physical, length, flags in sorted(extents):
        a, b = max(logical, start), min(logical + length, end)
        if a < b:
            pieces.append(_Piece(a, b, physical + (a - logical), flags))
    return pieces


def _same(a: _Piece | None, b: _Piece | None, at: int) -> bool:
    """True when both files certainly read the same at ``at`` (to the next boundary)."""
    a_zero = a is None or a.zero
    b_zero = b is None or b.zero
    if a_zero and b_zero:
        return True
    if a is None or b is None or (a.flags | b.flags) & UNRELIABLE:
        return False
    if bool(a.flags & FIEMAP_EXTENT_UNWRITTEN) != bool(b.flags & FIEMAP_EXTENT_UNWRITTEN):
        return False
    return a.physical + (at - a.start) == b.physical + (at - b.start)


def changed_between(older_path: str, newer_path: str, start: int, length: int
                    ) -> list[tuple[int, int]]:
    """Ranges of ``[start, start+length)`` whose content may differ between two clones.

    ``(offset, length)`` pairs relative to ``start``, sorted and merged, in
    filesystem blocks (clipped to the range). Both files must be clones of one
    file that are never written: same physical blocks mean same bytes.
    """
    end = start + length
    older = _pieces(file_extents(older_path, start, length), start, end)
    newer = _pieces(file_extents(newer_path, start, length), start, end)
    pieces = older + newer
    bounds = sorted({start, end, *(p.start for p in pieces), *(p.end for p in pieces)})
    changed: list[tuple[int, int]] = []
    i = j = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        while i < len(older) and older[i].end <= a:
            i += 1
        while j < len(newer) and newer[j].end <= a:
            j += 1
        old = older[i] if i < len(older) and older[i].start <= a else None
        new = newer[j] if j < len(newer) and newer[j].start <= a else None
        if _same(old, new, a):
            continue
        if changed and changed[-1][0] + changed[-1][1] == a - start:
            changed[-1] = (changed[-1][0], changed[-1][1] + b - a)
        else:
            changed.append((a - start, b - a))
    return changed
