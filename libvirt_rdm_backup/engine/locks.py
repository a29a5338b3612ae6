"""Host-wide lock per domain: one backup of a domain at a time, whatever the repository."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

from libvirt_rdm_backup.fslock import exclusive

LOCK_DIR = os.environ.get("RDM_BACKUP_LOCK_DIR", "/run/libvirt-rdm-backup/locks")


def domain_lock(domain_uuid: str, lock_dir: str = LOCK_DIR) -> AbstractContextManager[None]:
    """Hold the domain's lock, or fail at once when another backup holds it."""
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    return exclusive(os.path.join(lock_dir, f"{domain_uuid}.lock"),
                     f"another backup of domain {domain_uuid} is running on this host")
