"""Durable file updates: write a temporary file, sync it, rename it into place, sync the dir."""

from __future__ import annotations

import os
import secrets


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
