"""Exclusive, non-blocking file locks (``flock``): one holder at a time, or a clear refusal."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

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
