"""Durable file updates: write a temporary file, sync it, move it into place, sync the dir."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, tmp_dir: str | None = None) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a mix.

    The temporary file is created beside ``path`` (or in ``tmp_dir``, on the same
    filesystem) without following links; it is removed again on any failure.
    Raises OSError.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(tmp_dir or directory,
                       f".{os.path.basename(path)}.tmp-{secrets.token_hex(3)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


PARTIAL_SUFFIX = ".partial"


@contextmanager
def new_file_whole(path: str) -> Iterator[str]:
    """Create ``path`` only whole: yield a locked temporary name beside it to write into.

    When the block ends without error the file is synced and linked to ``path``
    (never over a file that appeared meanwhile: FileExistsError); on any error it
    is removed. One left by a killed writer (its lock gone with it) is removed by
    the next writer of the same ``path``. Raises OSError.
    """
    directory, name = os.path.split(os.path.abspath(path))
    remove_stale_partials(directory, name)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(3)}{PARTIAL_SUFFIX}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except OSError as err:  # no hard links here: a rename, after checking again
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "file exists", path) from err
            os.rename(tmp, path)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        fsync_dir(directory)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def remove_stale_partials(directory: str, name: str) -> list[str]:
    """Remove the temporary files of :func:`new_file_whole` for ``name`` no writer holds."""
    removed = []
    prefix = f".{name}."
    for entry in os.listdir(directory):
        if not (entry.startswith(prefix) and entry.endswith(PARTIAL_SUFFIX)):
            continue
        stale = os.path.join(directory, entry)
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            os.unlink(stale)
            removed.append(stale)
        finally:
            os.close(fd)
    return removed
