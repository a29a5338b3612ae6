"""libvirt-rdm-backup: backup and restore of raw disks of libvirt/QEMU virtual machines.

The public API::

    from libvirt_rdm_backup import backup, restore, verify, list_backups
    from libvirt_rdm_backup import discover, describe, map_disks
"""

from libvirt_rdm_backup.api import (
    backup,
    describe,
    discover,
    list_backups,
    map_disks,
    restore,
    verify,
)
from libvirt_rdm_backup.errors import RdmBackupError

__version__ = "0.1.0"

__all__ = [
    "RdmBackupError",
    "backup",
    "describe",
    "discover",
    "list_backups",
    "map_disks",
    "restore",
    "verify",
]
