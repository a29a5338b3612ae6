"""Host-wide lock per domain: one backup of a domain at a time, whatever the repository."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

from libvirt_rdm_backup.fslock import exclusive

LOCK_DIR_ENV = "RDM_BACKUP_LOCK_DIR"
DEFAULT_LOCK_DIR = "/run/libvirt-rdm-backup/locks"


def lock_dir() -> str:
    """Directory of the host's locks (``RDM_BACKUP_LOCK_DIR``)."""
    return os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR


def domain_lock(domain_uuid: str, directory: str | None = None
                ) -> AbstractContextManager[None]:
    """Hold the domain's lock, or fail at once when another backup holds it."""
    directory = directory or lock_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return exclusive(os.path.join(directory, f"{domain_uuid}.lock"),
                     f"another backup of domain {domain_uuid} is running on this host")
