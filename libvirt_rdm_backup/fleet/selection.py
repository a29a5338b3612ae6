"""Which domains a run of ``backup --all`` backs up, which it skips, and why."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import libvirt

from libvirt_rdm_backup.domain.inventory import all_domains, xml_inventory
from libvirt_rdm_backup.errors import RdmBackupError, UsageError

MAX_PATTERNS = 1000
MAX_PATTERN_LENGTH = 1024


@dataclass(frozen=True)
class Candidate:
    """A domain of the connection; ``skipped`` says why it is not backed up (None: it is)."""

    name: str
    uuid: str
    skipped: str | None = None


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """The ``--exclude`` patterns, checked (raises UsageError for an empty or odd one)."""
    if len(patterns) > MAX_PATTERNS:
        raise UsageError(f"backup: --exclude: at most {MAX_PATTERNS} patterns")
    for pattern in patterns:
        if not pattern or len(pattern) > MAX_PATTERN_LENGTH or not pattern.isprintable():
            raise UsageError(f"backup: --exclude: malformed pattern {pattern[:100]!r}")
    return list(patterns)


def exclusion(name: str, uuid: str, patterns: Sequence[str]) -> str | None:
    """The first pattern (fnmatch, case-sensitive) matching the domain's name or UUID, or None.

    A UUID is compared in its lowercase form; a pattern written in capitals matches it too.
    """
    for pattern in patterns:
        if (fnmatch.fnmatchcase(name, pattern)
                or fnmatch.fnmatchcase(uuid.lower(), pattern.lower())):
            return pattern
    return None


def _skip_reason(conn: libvirt.virConnect, dom: libvirt.virDomain) -> str | None:
    """Why the domain has nothing to back up (None when it has raw disks)."""
    try:
        inventory = xml_inventory(conn, dom)
    except RdmBackupError:  # its own backup tries again and reports why it fails
        return None if _exists(dom) else "the domain no longer exists"
    if inventory.raw:
        return None
    others = ", ".join(f"{d.target}: {d.reason}" for d in inventory.other)
    return "no raw disks" + (f" ({others})" if others else "")


def _exists(dom: libvirt.virDomain) -> bool:
    try:
        dom.info()
    except libvirt.libvirtError as err:
        return bool(err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN)
    return True


def candidates(conn: libvirt.virConnect, patterns: Sequence[str]) -> list[Candidate]:
    """Every domain not excluded by ``patterns``, by name, with why it is skipped if it is.

    Excluded domains are left out altogether (their XML is never read).
    """
    found = []
    for dom in all_domains(conn):
        name, uuid = str(dom.name()), str(dom.UUIDString())
        if exclusion(name, uuid, patterns) is not None:
            continue
        found.append(Candidate(name, uuid, _skip_reason(conn, dom)))
    return sorted(found, key=lambda c: (c.name, c.uuid))
