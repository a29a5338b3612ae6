"""Names in a repository: backup ids, disk and chain names, domain UUIDs, timestamps.

Everything a user or a manifest names is checked here before it becomes part of
a path (:class:`~.store.Repository`) or of a QEMU bitmap name.
"""

from __future__ import annotations

import re
import secrets
import uuid as uuidlib
from collections.abc import Container
from datetime import UTC, datetime

from libvirt_rdm_backup.errors import UsageError

BACKUP_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_backup_id(taken: Container[str] = ()) -> str:
    """A unique, path-safe backup id (``20261125T143000Z-1a2b3c``), none of ``taken``.

    The time is the clock's, which may have been set back: ids say when, by that
    clock, not in which order (:mod:`.order` does).
    """
    while True:
        backup_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
        if backup_id not in taken:
            return backup_id


def check_backup_id(backup_id: str) -> str:
    """Validate a backup id given by a user (raises UsageError)."""
    if not BACKUP_ID_RE.fullmatch(backup_id):
        raise UsageError(f"malformed backup id {backup_id!r}")
    return backup_id


def check_safe_name(name: str, what: str) -> str:
    """Validate a name used inside the repository (disk, chain)."""
    if not SAFE_NAME_RE.fullmatch(name):
        raise UsageError(f"malformed {what} {name!r}")
    return name


def check_uuid(domain_uuid: str) -> str:
    try:
        return str(uuidlib.UUID(domain_uuid))
    except ValueError as err:
        raise UsageError(f"malformed domain UUID {domain_uuid!r}") from err


def elapsed_seconds(start: str, end: str) -> float:
    """Seconds between two of our ISO timestamps (0 when unparsable)."""
    try:
        parse = datetime.fromisoformat
        return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))
                ).total_seconds()
    except ValueError:
        return 0.0
