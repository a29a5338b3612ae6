"""The one target of a run of many backups: how many may write to it at once, and a
repository directory made before the first of them starts."""

from __future__ import annotations

import logging

from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.targets.uri import parse_target

log = logging.getLogger(__name__)


def is_directory(target: str) -> bool:
    """True for a repository directory, False for an NBD volume (UsageError when malformed)."""
    return isinstance(parse_target(target, allow_remote_plain=True), str)


def writers(target: str, wanted: int) -> int:
    """How many backups may write to ``target`` at once: ``wanted`` for a directory, one for
    an NBD volume (it takes one writer at a time; a warning says so)."""
    if wanted > 1 and not is_directory(target):
        log.warning("an NBD volume takes one writer at a time: the domains are backed up "
                    "one after the other")
        return 1
    return wanted


def create_repository(target: str) -> None:
    """Make a directory target a repository now, so that backups starting side by side do not
    race to create it (the second would find the first one's files in a new directory)."""
    parsed = parse_target(target, allow_remote_plain=True)
    if isinstance(parsed, str):
        Repository.open(parsed, create=True)
