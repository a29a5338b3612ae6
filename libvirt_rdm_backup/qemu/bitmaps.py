"""Dirty bitmaps of this tool: names, transaction actions, listing and removal.

A bitmap named ``rdmb-<repo>-<chain>-<backup-id>`` records every guest write
to a disk since the point in time of that backup. Bitmaps are not persistent:
they vanish with the QEMU process, which is how a restart is noticed.

A chain's bitmaps are the ones whose name is its prefix followed by exactly one
backup id (fixed form): chain ``daily`` never claims ``daily-offsite``'s, as a
plain prefix match would.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any

from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import PREFIX
from libvirt_rdm_backup.repository.ids import BACKUP_ID_RE

log = logging.getLogger(__name__)

GRANULARITY = 65536  # equal to the qcow2 cluster size of backup layers


def chain_prefix(repo_id: str, chain: str) -> str:
    """Prefix of every bitmap of one chain of one repository."""
    return f"{PREFIX}-{repo_id}-{chain}-"


def bitmap_name(repo_id: str, chain: str, backup_id: str) -> str:
    """The bitmap that tracks changes since backup ``backup_id``."""
    return chain_prefix(repo_id, chain) + backup_id


def in_chain(name: str, prefix: str) -> bool:
    """True when bitmap ``name`` is :func:`chain_prefix` ``prefix`` and one backup id."""
    return name.startswith(prefix) and bool(BACKUP_ID_RE.fullmatch(name[len(prefix):]))


def made_for(name: str | None, repo_id: str, chain: str, backup_id: str) -> bool:
    """True when ``name`` (read from a manifest) is the bitmap this tool made for that
    backup of that chain: any other would hand a later backup the wrong writes."""
    return name == bitmap_name(repo_id, chain, backup_id)


def add_action(node: str, name: str) -> dict[str, Any]:
    """A ``block-dirty-bitmap-add`` transaction action (non-persistent, 64 KiB)."""
    return {
        "type": "block-dirty-bitmap-add",
        "data": {"node": node, "name": name, "granularity": GRANULARITY, "persistent": False},
    }


def node_bitmaps(monitor: Monitor) -> dict[str, dict[str, dict[str, Any]]]:
    """``{node-name: {bitmap-name: info}}`` of every block node."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for node in monitor.execute("query-named-block-nodes", {"flat": True}) or []:
        bitmaps = {str(b["name"]): b for b in node.get("dirty-bitmaps") or []}
        if bitmaps:
            found[str(node["node-name"])] = bitmaps
    return found


def remove(monitor: Monitor, node: str, name: str) -> None:
    """Remove a bitmap (a missing one is not an error)."""
    with suppress(RdmBackupError):
        monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


def remove_unneeded(monitor: Monitor, prefix: str, keep: set[str]) -> list[str]:
    """Remove the bitmaps of chain ``prefix`` not in ``keep`` (leftovers of failed runs)."""
    removed = []
    for node, bitmaps in node_bitmaps(monitor).items():
        for name in bitmaps:
            if in_chain(name, prefix) and name not in keep:
                log.info("removing stale dirty bitmap %s on %s", name, node)
                remove(monitor, node, name)
                removed.append(name)
    return removed
