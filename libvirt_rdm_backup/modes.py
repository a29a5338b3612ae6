"""The named choices of a backup: its level, its quiesce mode, how its point was fixed.

String-valued: each member is its JSON and command-line spelling.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from libvirt_rdm_backup.errors import UsageError


class Level(StrEnum):
    """The level a backup asks for (``auto`` decides per disk) or a disk got."""

    FULL = "full"
    INCREMENTAL = "incremental"  # the writes since the chain's previous backup
    DIFFERENTIAL = "differential"  # the writes since the chain's last full backup
    RESYNC = "resync"  # the chunks that differ from the previous backup, read whole
    AUTO = "auto"


class Quiesce(StrEnum):
    """Freezing the guest's filesystems through its agent while the point is fixed."""

    TRY = "try"  # crash-consistent (the guest paused) when the agent cannot freeze
    REQUIRED = "required"  # fail without a working agent


class Compression(StrEnum):
    """How QEMU compresses the clusters of new layers (the qcow2 ``compression_type``)."""

    ZSTD = "zstd"
    ZLIB = "zlib"


class WindowMethod(StrEnum):
    """How a backup's point in time was fixed (the manifest's ``consistency.method``)."""

    OFFLINE = "offline"  # the domain was not running
    QMP_TRANSACTION = "qmp-transaction"  # one QMP transaction, the guest running
    STORAGE_SNAPSHOT = "storage-snapshot"  # one disk's storage snapshot alone, the guest running
    FSFREEZE = "fsfreeze"
    PAUSE = "pause"
    FSFREEZE_PAUSE = "fsfreeze+pause"
    ALREADY_PAUSED = "already-paused"  # paused before the backup, left so


Choice = TypeVar("Choice", bound=StrEnum)


def parse_choice(kind: type[Choice], value: str, what: str) -> Choice:
    """``value`` as a member of ``kind`` (raises UsageError naming the choices)."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise UsageError(f"unknown {what} {value!r} (one of {choices})") from None
