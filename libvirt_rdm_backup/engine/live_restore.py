"""Live restore: a shut-off domain runs from its backup at once while the data flows back.

Each restored disk is started on a qcow2 overlay (a private 0700 directory, owned by
QEMU's user) whose backing store is the backup point, served read-only over NBD on a unix
socket by a private storage daemon while the store is held for reading. The domain is
started paused from a live definition with those disks switched (the persistent one is
kept as it is), a libvirt block copy per disk (write-blocking) writes the overlay chain
into the disk's own source, the guest is resumed, and each disk pivots onto its LUN once
its copy is ready; then the export and the overlays go. See docs/live-restore.md.

A rerun on a domain that still runs on its overlays (the tool was killed, the backup
server went away) serves the same point again at the same socket, starts a new copy
where none runs, resumes a guest that an I/O error paused, and goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import libvirt

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.domain import live_copy, live_xml
from libvirt_rdm_backup.domain.connection import domain_xml, is_running, lookup_domain
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.engine.restore import open_target, refuse_store_paths
from libvirt_rdm_backup.engine.selection import choose_backup
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.engine.verify import verify_lineage
from libvirt_rdm_backup.errors import LibvirtError, NotFoundError, OperationError, UsageError
from libvirt_rdm_backup.fileutil import write_atomic
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.locks import lock_dir
from libvirt_rdm_backup.process import stall_timeout
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.block_copy import bwlimit_speed
from libvirt_rdm_backup.qemu.point_export import served_points
from libvirt_rdm_backup.repository.ids import check_safe_name

log = logging.getLogger(__name__)

SCRATCH_DIR_ENV = "RDM_BACKUP_SCRATCH_DIR"
DEFAULT_SCRATCH_DIR = "/var/tmp"
STATE = "state.json"
SOCKET = "nbd.sock"
LOOK_EVERY = 0.5  # seconds between looks at the copies
RESTART_WAIT = 20.0  # seconds a rerun's copy gets to start moving
RESTART_EVERY = 0.5
LiveProgress = Callable[[str, int, int], None]


@dataclass
class LiveDisk:
    """One disk restored live."""

    disk: str
    to: str  # the disk's own source (device path or iSCSI URL)
    size: int  # bytes of the LUN (and of its overlay)
    point_size: int  # bytes of the backup point
    copied: int = 0
    pivoted: bool = False
    destination: str = field(default="", repr=False)  # block copy destination XML

    def to_dict(self) -> dict[str, Any]:
        """One disk of the ``restore --live --json`` document."""
        return {"disk": self.disk, "to": self.to, "size": self.size,
                "point_size": self.point_size, "copied_bytes": self.copied,
                "pivoted": self.pivoted}


@dataclass
class LiveRestoreResult:
    """What a live restore did."""

    domain_name: str
    domain_uuid: str
    backup_id: str
    disks: list[LiveDisk]
    resumed_run: bool  # a rerun that took over a restore in progress
    running_after: float  # seconds from the start until the guest ran
    seconds: float  # seconds in all

    def to_dict(self) -> dict[str, Any]:
        """The ``restore --live --json`` document."""
        return {"domain": self.domain_name, "domain_uuid": self.domain_uuid,
                "backup_id": self.backup_id, "live": True, "resumed_run": self.resumed_run,
                "running_after_seconds": round(self.running_after, 3),
                "seconds": round(self.seconds, 3),
                "disks": [d.to_dict() for d in self.disks]}


def scratch_dir(domain_uuid: str) -> str:
    """The domain's private overlay directory (under ``$RDM_BACKUP_SCRATCH_DIR``)."""
    root = os.environ.get(SCRATCH_DIR_ENV) or DEFAULT_SCRATCH_DIR
    return os.path.join(os.path.abspath(root), f"rdmb-live-{domain_uuid}")


def live_restore(conn: libvirt.virConnect, domain: str, target: str,
                 backup_id: str | None = None, disks: list[str] | None = None,
                 bwlimit: float | None = None, progress: LiveProgress | None = None,
                 tls_dir: str | None = None, running: Callable[[], None] | None = None
                 ) -> LiveRestoreResult:
    """Start shut-off ``domain`` on its backup (newest, or ``backup_id``) and copy the point
    of each of ``disks`` (default: every disk of the backup) back onto its source; return
    once every disk runs on its source again. ``progress`` gets (disk, copied, total);
    ``running`` is called once the guest runs."""
    started = time.monotonic()
    speed = bwlimit_speed(bwlimit)
    for name in disks or ():
        check_safe_name(name, "disk name")
    dom = lookup_domain(conn, domain)
    uuid = dom.UUIDString()
    with _domain_busy(uuid):
        return _live_restore(conn, dom, target, backup_id, disks, speed, progress, tls_dir,
                             running, started)


def _domain_busy(uuid: str) -> AbstractContextManager[None]:
    """The host-wide lock of the domain (backups and exports of it take it too)."""
    os.makedirs(lock_dir(), mode=0o700, exist_ok=True)
    return exclusive(os.path.join(lock_dir(), f"{uuid}.lock"),
                     f"domain {uuid} is busy: a backup, export or live restore of it runs "
                     "on this host")


def _live_restore(conn: libvirt.virConnect, dom: libvirt.virDomain, target: str,
                  backup_id: str | None, disks: list[str] | None, speed: int,
                  progress: LiveProgress | None, tls_dir: str | None,
                  running: Callable[[], None] | None, started: float) -> LiveRestoreResult:
    uuid = dom.UUIDString()
    work = scratch_dir(uuid)
    recorded = _rerun_state(dom, work)
    if recorded is not None:
        backup_id = _same_backup(recorded, backup_id)
        disks = _same_disks(recorded, disks)
    with open_store(target, tls_dir=tls_dir) as store, store.reading(uuid):
        manifest = choose_backup(store, uuid, backup_id)
        persistent = domain_xml(dom, inactive=True)
        planned, nodes = _plan(store, manifest, persistent, disks, conn, recorded is not None)
        owner = _qemu_owner(conn, persistent)
        if recorded is None:
            _prepare_dir(work, owner)
            write_atomic(os.path.join(work, STATE), json.dumps(
                {"backup_id": manifest.backup_id, "disks": [d.disk for d in planned],
                 "running": False}).encode())
        socket = os.path.join(work, SOCKET)
        with served_points(nodes, store.qemu_objects(), socket, owner):
            if recorded is None:
                _start_on_overlays(conn, dom, persistent, planned, work, socket)
            _start_copies(dom, planned, speed, recorded is None)
            _run_guest(dom, work, recorded)
            running_after = time.monotonic() - started
            if running is not None:
                running()
            try:
                _follow(dom, planned, progress)
            except KeyboardInterrupt:
                log.warning("interrupted: %s keeps its writes on the overlays in %s; reads "
                            "of what was not copied back yet pause it; rerun the same "
                            "restore --live to go on", dom.name(), work)
                raise
    shutil.rmtree(work, ignore_errors=True)
    return LiveRestoreResult(str(dom.name()), uuid, manifest.backup_id, planned,
                             recorded is not None, running_after, time.monotonic() - started)


def _rerun_state(dom: libvirt.virDomain, work: str) -> dict[str, Any] | None:
    """What an earlier run recorded, when the domain still runs on its overlays (None: a
    fresh start; UsageError when the domain runs otherwise)."""
    state_path = os.path.join(work, STATE)
    if not is_running(dom):
        if os.path.lexists(work):  # an earlier run that ended with the domain shut off
            log.info("removing the overlays of an earlier live restore in %s", work)
            shutil.rmtree(work, ignore_errors=True)
        return None
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        live = domain_xml(dom)
        on_overlay = [d for d in state["disks"]
                      if (live_xml.disk_source_file(live, d) or "").startswith(work + "/")]
    except (OSError, ValueError, KeyError, TypeError):
        state, on_overlay = None, []
    if state is None or not on_overlay:
        raise UsageError(f"domain {dom.name()} is running: a live restore starts a shut-off "
                         "domain (shut it down first)")
    log.warning("domain %s runs on the overlays of an unfinished live restore of backup %s; "
                "taking it over", dom.name(), state["backup_id"])
    state["disks"] = on_overlay
    return dict(state)


def _same_backup(recorded: dict[str, Any], backup_id: str | None) -> str:
    if backup_id is not None and backup_id != recorded["backup_id"]:
        raise UsageError(f"the domain runs on backup {recorded['backup_id']} of an unfinished "
                         f"live restore; rerun with that backup, not {backup_id}")
    return str(recorded["backup_id"])


def _same_disks(recorded: dict[str, Any], disks: list[str] | None) -> list[str]:
    left = [str(d) for d in recorded["disks"]]
    if disks and sorted(disks) != sorted(left):
        raise UsageError(f"the unfinished live restore is of {', '.join(left)}; rerun it "
                         "without --disk or with exactly those disks")
    return left


def _plan(store: Store, manifest: Any, persistent: str, disks: list[str] | None,
          conn: libvirt.virConnect, rerun: bool
          ) -> tuple[list[LiveDisk], dict[str, dict[str, Any]]]:
    """The disks to restore, checked, and the blockdev options of each one's point."""
    root = live_xml.parse(persistent)
    inventory = inventory_from_xml(DomainXML.parse(persistent), False)
    names = disks or [d.disk.target for d in manifest.disks]
    if len(set(names)) != len(names):
        raise UsageError("a disk was named twice")
    planned: list[LiveDisk] = []
    nodes: dict[str, dict[str, Any]] = {}
    for name in names:
        record = manifest.disk(name)
        if record is None:
            raise NotFoundError(f"backup {manifest.backup_id} has no disk {name!r}")
        element = live_xml.disk_element(root, name)
        try:
            live_xml.check_restorable(element, name)
        except UsageError as err:
            raise UsageError(f"{err}{'' if disks else '; name the disks to restore with --disk'}"
                             ) from err
        raw = inventory.find(name)
        if not isinstance(raw, RawDisk) or not raw.source:
            raise UsageError(f"disk {name} has no source this host can write")
        size = _source_size(raw, store, record.size, conn, rerun)
        item = LiveDisk(name, raw.source, size, record.size)
        item.destination = live_xml.copy_destination(element)
        planned.append(item)
        nodes[name] = store.image_node(verify_lineage(store, manifest, name))
    return planned, nodes


def _source_size(raw: RawDisk, store: Store, point_size: int, conn: libvirt.virConnect,
                 rerun: bool) -> int:
    """Bytes of the disk's source; refused when smaller than the point, inside the store,
    or (before the domain runs) used by anyone."""
    if raw.source_path:
        refuse_store_paths(store, raw.source_path)
        if rerun:
            return _device_size(raw.source_path)
        with open_target(raw.source_path, point_size, False, conn) as dest:
            if not dest.exists:
                raise UsageError(f"the source of disk {raw.target}, {raw.source_path}, "
                                 "does not exist")
            size = dest.size()
    else:
        size = img.virtual_size(raw.source, "raw")
        if size < point_size:
            raise UsageError(f"{raw.source} is too small ({size} bytes, the disk has "
                             f"{point_size})")
    return size


def _device_size(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise OperationError(f"cannot open {path}: {err.strerror}") from err
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _qemu_owner(conn: libvirt.virConnect, persistent: str) -> tuple[int, int] | None:
    """The uid and gid the domain's QEMU runs as (None: unknown; root is assumed)."""
    try:
        capabilities = str(conn.getCapabilities())
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot read the host capabilities: {err}") from err
    virt_type = live_xml.parse(persistent).get("type", "kvm")
    return live_xml.dac_owner(capabilities, virt_type)


def _prepare_dir(work: str, owner: tuple[int, int] | None) -> None:
    """A fresh 0700 directory only root and QEMU's user reach."""
    try:
        os.makedirs(os.path.dirname(work), exist_ok=True)
        os.mkdir(work, 0o700)
        info = os.lstat(work)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OperationError(f"{work} is not a directory of this tool")
        if owner is not None:
            os.chown(work, *owner)
    except FileExistsError as err:
        raise OperationError(f"{work} exists: another live restore of this domain runs, or "
                             "one was cut short while starting (remove it)") from err
    except OSError as err:
        raise OperationError(f"cannot create the overlay directory {work}: "
                             f"{err.strerror}") from err


def _start_on_overlays(conn: libvirt.virConnect, dom: libvirt.virDomain, persistent: str,
                       planned: list[LiveDisk], work: str, socket: str) -> None:
    """Create the overlays and start the domain paused from its live definition."""
    overlays = []
    for item in planned:
        path = os.path.join(work, f"{item.disk}.qcow2")
        img.create(path, "qcow2", item.size)
        overlays.append(live_xml.Overlay(item.disk, path, socket, item.disk))
    try:
        conn.createXML(live_xml.live_definition(persistent, overlays),
                       libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as err:
        shutil.rmtree(work, ignore_errors=True)
        raise LibvirtError(f"cannot start domain {dom.name()} on its backup: "
                           f"{err.get_error_message()}") from err


def _start_copies(dom: libvirt.virDomain, planned: list[LiveDisk], speed: int,
                  fresh: bool) -> None:
    """A block copy for each disk that has none; a fresh start that cannot is undone (the
    guest never ran)."""
    try:
        for item in planned:
            if not fresh:
                _restart_copy(dom, item, speed)
            elif live_copy.copy_state(dom, item.disk) is None:
                live_copy.start_copy(dom, item.disk, item.destination, speed)
    except LibvirtError:
        if fresh:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        raise


def _restart_copy(dom: libvirt.virDomain, item: LiveDisk, speed: int) -> None:
    """The copy of a rerun, until it moves: QEMU's NBD client, which lost the server of the
    earlier run, reconnects in the background once a request failed, so a new copy may
    fail at its first read and is started again."""

    def moving() -> bool:
        state = live_copy.copy_state(dom, item.disk)
        if state is None:
            live_copy.start_copy(dom, item.disk, item.destination, speed)
            return False
        return state.done > 0

    retry.until(RESTART_WAIT, RESTART_EVERY,
                f"the copy of {item.disk} does not start: the domain does not reach the "
                "served backup")(moving)


def _run_guest(dom: libvirt.virDomain, work: str, recorded: dict[str, Any] | None) -> None:
    """Resume the vCPUs: paused by the start, or by an I/O error; a guest a user paused
    after it ran stays paused."""
    reason = live_copy.pause_reason(dom)
    if reason is None:
        return
    ran = recorded is not None and bool(recorded.get("running"))
    if ran and reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
        log.warning("domain %s is paused; it stays paused", dom.name())
        return
    live_copy.resume(dom)
    path = os.path.join(work, STATE)
    try:
        with open(path, encoding="utf-8") as handle:
            state = dict(json.load(handle))
        state["running"] = True
        write_atomic(path, json.dumps(state).encode())
    except (OSError, ValueError) as err:
        log.warning("cannot record that the guest runs in %s: %s", path, err)


def _follow(dom: libvirt.virDomain, planned: list[LiveDisk],
            progress: LiveProgress | None) -> None:
    """Report progress until every disk pivoted onto its source (OperationError when a
    copy stopped, or made no progress for the stall limit)."""
    stall = stall_timeout()
    seen: dict[str, Any] = {"moved": -1, "at": time.monotonic(), "paused": False}

    def look() -> bool:
        for item in (i for i in planned if not i.pivoted):
            _look_at(dom, item, progress)
        paused = live_copy.pause_reason(dom) == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        if paused and not seen["paused"]:
            log.warning("the guest was paused by an I/O error (%s); it resumes with "
                        "`virsh resume` or a rerun once the cause is fixed", _why_stopped(dom))
        seen["paused"] = paused
        done = all(item.pivoted for item in planned)
        total, now = sum(i.copied for i in planned), time.monotonic()
        if total != seen["moved"]:
            seen["moved"], seen["at"] = total, now
        elif now - seen["at"] > stall and not done:
            raise OperationError(f"the copy back made no progress for {stall:g} s; rerun "
                                 "the same restore --live to go on")
        return done

    retry.until(None, LOOK_EVERY, "the copy back did not end")(look)


def _look_at(dom: libvirt.virDomain, item: LiveDisk, progress: LiveProgress | None) -> None:
    """One look at a disk's copy: its progress, and the pivot once it is ready."""
    state = live_copy.copy_state(dom, item.disk)
    if state is None:
        raise OperationError(
            f"the copy of {item.disk} onto {item.to} stopped before it finished "
            f"({_why_stopped(dom)}); the guest keeps its writes on the overlay: "
            "rerun the same restore --live to go on")
    item.copied = state.done
    if progress is not None:
        progress(item.disk, state.done, state.total)
    if state.caught_up and live_copy.pivot(dom, item.disk):
        item.pivoted = True
        log.info("%s runs on %s again", item.disk, item.to)


def _why_stopped(dom: libvirt.virDomain) -> str:
    """The disks' I/O errors as libvirt saw them, or the domain's state."""
    try:
        errors = dom.diskErrors()
        state, reason = dom.state()
    except libvirt.libvirtError as err:
        return f"libvirt: {err.get_error_message()}"
    names = {libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC: "I/O error",
             libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE: "no space left"}
    found = [f"{disk}: {names.get(code, 'error')}" for disk, code in sorted(errors.items())
             if code != libvirt.VIR_DOMAIN_DISK_ERROR_NONE]
    if found:
        return "; ".join(found)
    paused = state == libvirt.VIR_DOMAIN_PAUSED
    return "guest paused" if paused and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR \
        else "no disk error reported"
