"""Finding and removing what a killed run of this tool left in a running QEMU."""

from __future__ import annotations

import logging
from contextlib import suppress

from libvirt_rdm_backup.errors import OperationError, RdmBackupError
from libvirt_rdm_backup.qemu.guard import restore_drives
from libvirt_rdm_backup.qemu.jobs import cancel_jobs
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import is_ours

log = logging.getLogger(__name__)


def remove_leftovers(monitor: Monitor) -> list[str]:
    """Cancel our jobs, delete our block nodes and fd sets; return what was removed.

    Only call this while holding the domain's lock: then nothing of ours is in use.
    Bitmaps are left alone here; chains decide which of theirs are still needed.
    """
    removed: list[str] = []
    jobs = [str(j["id"]) for j in monitor.execute("query-jobs") or [] if is_ours(str(j["id"]))]
    if jobs:
        cancel_jobs(monitor, jobs)
        stuck = sorted(set(jobs) & {str(j["id"]) for j in monitor.execute("query-jobs") or []
                                    if j.get("status") not in ("concluded", "null")})
        if stuck:
            raise OperationError(f"QEMU job {stuck[0]} of an earlier run is still stopping "
                                 "(its storage is not answering); try again later")
        removed += [f"job {j}" for j in jobs]
    exports = monitor.execute("query-block-exports") or []
    for export in exports:
        if is_ours(str(export.get("id", ""))):
            with suppress(RdmBackupError):
                monitor.execute("block-export-del", {"id": export["id"], "mode": "hard"})
                removed.append(f"export {export['id']}")
    if removed and len(removed) == len(exports) + len(jobs):
        # every export was ours, so the NBD server serving them was ours too
        with suppress(RdmBackupError):
            monitor.execute("nbd-server-stop")
            removed.append("nbd server")
    removed += _remove_nodes(monitor)
    for fdset in monitor.execute("query-fdsets") or []:
        opaques = [str(fd.get("opaque", "")) for fd in fdset.get("fds") or []]
        if opaques and all(is_ours(o) for o in opaques):
            with suppress(RdmBackupError):
                monitor.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})
                removed.append(f"fdset {fdset['fdset-id']}")
    with suppress(RdmBackupError):
        monitor.execute("object-del", {"id": "rdmb-tls-client"})
        removed.append("tls object rdmb-tls-client")
    removed += _remove_secrets(monitor)
    for item in removed:
        log.info("removed leftover %s of an earlier run", item)
    return removed


def _remove_nodes(monitor: Monitor) -> list[str]:
    """Delete our block nodes, users before what they use; a guest device left behind our
    copy-before-write filter gets its own node back once nothing else uses the filter."""
    removed: list[str] = []
    drives_restored = False
    while True:
        failures: dict[str, RdmBackupError] = {}
        deleted = False
        for node in monitor.execute("query-named-block-nodes", {"flat": True}) or []:
            name = str(node.get("node-name", ""))
            if not is_ours(name):
                continue
            try:
                monitor.execute("blockdev-del", {"node-name": name})
                removed.append(f"node {name}")
                deleted = True
            except RdmBackupError as err:
                failures[name] = err
        if failures and not deleted and not drives_restored:
            removed += restore_drives(monitor)
            drives_restored = True
            continue
        if not failures or not deleted:
            break
    for name, failure in failures.items():
        log.warning("could not remove leftover node %s: %s", name, failure)
    return removed


def _remove_secrets(monitor: Monitor) -> list[str]:
    """Delete the key secrets a killed run left (``rdmb-key-*``; they hold a layer key)."""
    removed: list[str] = []
    try:
        objects = monitor.execute("qom-list", {"path": "/objects"}) or []
    except RdmBackupError as err:
        log.info("cannot list QEMU objects: %s", err)
        return removed
    for item in objects:
        name = str(item.get("name", ""))
        if name.startswith("rdmb-key-"):
            with suppress(RdmBackupError):
                monitor.execute("object-del", {"id": name})
                removed.append(f"secret {name}")
    return removed
