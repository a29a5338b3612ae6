"""Durable file updates: write a temporary file, sync it, move it into place, sync the dir."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ATOMIC_TAG = ".tmp-"  # write_atomic's temporary files: .NAME.tmp-XXXXXX
PARTIAL_SUFFIX = ".partial"  # new_file_whole's: .NAME.PID@HOST.XXXXXX.partial
STAGING_PREFIX = ".partial-"  # a repository's backups being written: .partial-<backup id>/
def read_regular(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes from the start of the regular file ``path``.

    For files read back from places the tool does not control: a symlink is not
    followed (``ELOOP``), a FIFO or device never blocks or is read (``EINVAL``).
    Raises OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | bytearray | tuple[bytes | bytearray, ...],
                 mode: int = 0o600, tmp_dir: str | None = None) -> None:
    """Replace ``path`` with ``data`` (or its parts, one after the other, never joined in
    memory): readers see the old file or the new one, never a mix.

    The temporary file is created beside ``path`` (or in ``tmp_dir``, on the same
    filesystem) without following links; it is removed again on any failure.
    Raises OSError.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(tmp_dir or directory,
                       f".{os.path.basename(path)}{ATOMIC_TAG}{secrets.token_hex(3)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            for part in data if isinstance(data, tuple) else (data,):
                stream.write(part)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


# tells the partial files of this host apart from those of others on shared storage
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _partial_stem(name: str) -> str:
    """The part of a partial file's name that stands for ``name`` (kept short enough)."""
    if len(name) <= 160:
        return name
    return name[:120] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]


@contextmanager
def new_file_whole(path: str) -> Iterator[str]:
    """Create ``path`` only whole: yield a temporary name beside it to write into.

    The temporary name (``.NAME.PID@HOST.XXXXXX.partial``) says which process writes
    it. When the block ends without error the file is synced and linked to ``path``
    (never over a file that appeared meanwhile: FileExistsError); on any error it is
    removed. One left by a killed writer is removed by the next writer of ``path``
    on the same host. Raises OSError.
    """
    directory, name = os.path.split(os.path.abspath(path))
    remove_stale_partials(directory, name)
    tmp = os.path.join(directory, f".{_partial_stem(name)}.{os.getpid()}@{HOST_TAG}."
                                  f"{secrets.token_hex(3)}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        yield tmp
        mine, now = os.fstat(fd), os.lstat(tmp)
        if (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino):
            raise OSError(errno.ESTALE, "the temporary file was replaced", tmp)
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except OSError as err:  # no hard links here: a rename, after checking again
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "file exists", path) from err
            os.rename(tmp, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def remove_stale_partials(directory: str, name: str) -> list[str]:
    """Remove the temporary files of :func:`new_file_whole` for ``name`` whose writer is gone.

    Only files of writers on this host are considered; a live writer's file stays.
    """
    pattern = re.compile(re.escape(f".{_partial_stem(name)}.") + r"(\d+)@"
                         + re.escape(HOST_TAG) + r"\.[0-9a-f]{6}" + re.escape(PARTIAL_SUFFIX))
    removed = []
    for entry in os.listdir(directory):
        found = pattern.fullmatch(entry)
        if found is None or _alive(int(found.group(1))):
            continue
        stale = os.path.join(directory, entry)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
            removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
