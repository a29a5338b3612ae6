"""libvirt-rdm-backup: backup and restore of raw disks of libvirt/QEMU virtual machines.

The public API (imported on first use, so that the libvirt hook starts fast)::

    from libvirt_rdm_backup import backup, restore, verify, list_backups
    from libvirt_rdm_backup import discover, describe, map_disks, export
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from libvirt_rdm_backup.errors import RdmBackupError

if TYPE_CHECKING:
    from libvirt_rdm_backup.api import (
        backup,
        describe,
        discover,
        export,
        list_backups,
        map_disks,
        restore,
        verify,
    )

__version__ = "0.1.0"

__all__ = [
    "RdmBackupError",
    "backup",
    "describe",
    "discover",
    "export",
    "list_backups",
    "map_disks",
    "restore",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("libvirt_rdm_backup.api"), name)
    raise AttributeError(f"module 'libvirt_rdm_backup' has no attribute {name!r}")
