"""Host-wide lock per domain: one backup of a domain at a time, whatever the repository."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from libvirt_rdm_backup.errors import OperationError

LOCK_DIR = os.environ.get("RDM_BACKUP_LOCK_DIR", "/run/libvirt-rdm-backup/locks")


@contextmanager
def domain_lock(domain_uuid: str, lock_dir: str = LOCK_DIR) -> Iterator[None]:
    """Hold the domain's lock, or fail at once when another backup holds it."""
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(lock_dir, f"{domain_uuid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OperationError(
                    f"another backup of domain {domain_uuid} is running on this host"
                ) from err
            raise
        yield
    finally:
        os.close(fd)
