"""Exclusive file locks (``flock``): one holder at a time, a clear refusal or a bounded wait."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError


@contextmanager
def exclusive(path: str, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600); OperationError(``busy``) if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OperationError(busy) from err
            raise
        yield
    finally:
        os.close(fd)


@contextmanager
def waiting(path: str, timeout: float, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive lock (``shared``: one of many shared ones) on ``path`` (created
    0600, never through a symlink), waiting up to ``timeout`` seconds for the holders of
    the other kind to let go; OperationError after that."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        retry.flock_wait(path, timeout)(_lock_now, fd, fcntl.LOCK_SH if shared
                                        else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock_now(fd: int, mode: int) -> bool:
    """One attempt: True, or BlockingIOError while another process holds the lock."""
    fcntl.flock(fd, mode | fcntl.LOCK_NB)
    return True
