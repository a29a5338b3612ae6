"""Work a published backup leaves to finish while its caller goes on: removing the storage
snapshots the new point superseded.

Such a removal is a monitor operation on Ceph (a new OSD map, which the monitors commit at
most about once a second), so it runs in a thread of this process instead of before
:func:`~libvirt_rdm_backup.engine.backup.backup` returns. The threads are not daemons: the
interpreter waits for them before the process exits. A removal cut short (a killed process)
leaves a snapshot no kept point names; the next backup of the chain removes it
(``prune`` of the snapshot agent). The next backup of the same disk in this process waits
for the removals of that disk first (:func:`settle`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.repository.chain import Chain, DiskPoint
from libvirt_rdm_backup.storage.snapshot_agents import manifest_snapshot

log = logging.getLogger(__name__)

# Agents whose snapshots are removed in a thread: slow to remove (a Ceph monitor commit),
# safe to remove from another thread (librbd)
BACKGROUND_REMOVAL = frozenset({"rbd"})
_LOCK = threading.Lock()
_PENDING: dict[str, list[threading.Thread]] = {}  # key (domain UUID and disk) -> threads


def defer(key: str, what: str, work: Callable[[], None]) -> None:
    """Run ``work`` in a thread of this process; ``what`` names it in the log."""

    def run() -> None:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - logged; the next backup retries
            log.warning("%s failed (the next backup retries): %s", what, str(err)[:200])

    thread = threading.Thread(target=run, name=f"rdmb-deferred-{key}", daemon=False)
    with _LOCK:
        _PENDING.setdefault(key, []).append(thread)
    thread.start()


def settle(key: str | None = None, timeout: float | None = None) -> bool:
    """Wait for the deferred work of ``key`` (None: all); False when ``timeout`` (seconds,
    for each thread) ran out first."""
    with _LOCK:
        keys = [key] if key is not None else list(_PENDING)
        threads = [t for k in keys for t in _PENDING.pop(k, [])]
    done = True
    for thread in threads:
        thread.join(timeout)
        if thread.is_alive():
            done = False
            with _LOCK:
                _PENDING.setdefault(thread.name.removeprefix("rdmb-deferred-"), []).append(thread)
    return done


def settle_disks(domain_uuid: str, disks: list[str]) -> None:
    """Wait for this process's deferred removals of the domain's ``disks``' snapshots."""
    for disk in disks:
        settle(f"{domain_uuid}/{disk}")


def drop_superseded(
    repo_id: str, chain: Chain, domain_uuid: str, superseded: list[tuple[RawDisk, DiskPoint]]
) -> None:
    """Remove the storage snapshots of ``superseded`` points that no kept point of the
    chain (already holding the new one) names: now, or in a thread for the agents of
    :data:`BACKGROUND_REMOVAL`."""
    needed = chain.needed_snapshots()
    for disk, point in superseded:
        data = point.record.storage_snapshot or {}
        if str(data.get("name")) in needed:
            continue
        work = partial(_delete_snapshot, data, disk, repo_id, chain.name, point.backup_id)
        if str(data.get("agent")) in BACKGROUND_REMOVAL:
            defer(
                f"{domain_uuid}/{disk.target}",
                f"removing storage snapshot {data.get('name')}",
                work,
            )
        else:
            work()


def _delete_snapshot(
    data: dict[str, Any], disk: RawDisk, repo_id: str, chain: str, backup_id: str
) -> None:
    found = manifest_snapshot(data, disk, repo_id, chain, backup_id)
    if found is None:
        return
    try:
        found[0].delete(disk, found[1])
    except RdmBackupError as err:
        log.warning("could not delete storage snapshot %s: %s", data.get("name"), err)
