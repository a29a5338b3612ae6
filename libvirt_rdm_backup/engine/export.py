"""Pull mode: a point-in-time, read-only NBD export of raw disks of a running domain.

Under the domain's lock, one QMP transaction starts a fleecing job per disk
(:class:`~libvirt_rdm_backup.qemu.fleece.FleecingExport`: a scratch qcow2 node
backed by the disk, ``blockdev-backup`` sync=none), so every exported disk shows
the same point in time. QEMU runs one NBD server per process: it is started
once, on a socket we bind and hand over with ``getfd`` (a unix socket in a fresh
0700 directory, or a TCP socket), with one read-only export per disk, named by
the disk's target (``vdb``).

With a repository, the writes since the chain's last backup of a disk are
offered as the NBD metadata context ``qemu:dirty-bitmap:<name>``. QEMU 7.2
refuses to export an enabled bitmap of a writable node read-only, and the
chain's bitmap must go on recording anyway; so the same transaction adds a
disabled temporary bitmap on the scratch node and merges the chain's bitmap
into it: it holds exactly the writes between that backup and the point in
time. The chain's bitmap is only read.

Teardown runs in reverse, every step even when one fails: exports, server,
socket, temporary bitmaps, jobs, scratch nodes and files. A run that was killed
leaves jobs, nodes and exports named ``rdmb-*``; the next backup or export of
the domain removes them (the temporary bitmaps go with their scratch nodes).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import libvirt

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.engine.discover import fill_live_facts, open_domain, select_disks
from libvirt_rdm_backup.engine.file_store import FileStore
from libvirt_rdm_backup.engine.listeners import parse_listen, unix_listener
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    NotFoundError,
    NotRawDiskError,
    OperationError,
    QmpError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.locks import domain_lock
from libvirt_rdm_backup.qemu import bitmaps
from libvirt_rdm_backup.qemu.fleece import FleecingExport, start_nbd_server
from libvirt_rdm_backup.qemu.jobs import transaction
from libvirt_rdm_backup.qemu.leftovers import remove_leftovers
from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor, Monitor, qmp_timeout
from libvirt_rdm_backup.qemu.names import PREFIX, object_name
from libvirt_rdm_backup.qemu.nbd_server import SOCKET_ROOT, private_socket_dir
from libvirt_rdm_backup.repository.chain import DEFAULT_CHAIN, DiskPoint, chain_of, lineage
from libvirt_rdm_backup.repository.ids import check_safe_name, now_iso
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.sockets import host_port, tcp_listener
from libvirt_rdm_backup.window_record import recover_window

log = logging.getLogger(__name__)

SCRATCH_DIR_ENV = "RDM_BACKUP_SCRATCH_DIR"
DEFAULT_SCRATCH_DIR = "/var/tmp"
BITMAP_CONTEXT_PREFIX = "qemu:dirty-bitmap:"


@dataclass
class ExportedDisk:
    """One disk of an export: its NBD export and, maybe, its dirty-bitmap context."""

    disk: str
    size: int
    uri: str
    dirty_since: str | None = None  # backup id the dirty bitmap counts from
    bitmap_context: str | None = None
    bitmap_note: str | None = None  # why there is no dirty bitmap (with a repository)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"disk": self.disk, "export": self.disk, "size": self.size, "uri": self.uri,
                "dirty_since": self.dirty_since, "bitmap_context": self.bitmap_context,
                "bitmap_note": self.bitmap_note}


@dataclass
class Export:
    """A running export: what a reader needs, and a health check."""

    domain_name: str
    domain_uuid: str
    point_in_time: str
    disks: list[ExportedDisk]
    socket: str | None = None  # unix socket path
    address: str | None = None  # ``host:port`` of a TCP listener
    chain: str | None = None
    _fleeces: list[FleecingExport] = field(default_factory=list, repr=False)

    @property
    def uris(self) -> dict[str, str]:
        """``{disk: NBD URI}``."""
        return {d.disk: d.uri for d in self.disks}

    @property
    def bitmap_context(self) -> str | None:
        """``qemu:dirty-bitmap:<name>`` of the disks that have one (one name for all)."""
        return next((d.bitmap_context for d in self.disks if d.bitmap_context), None)

    def check(self) -> None:
        """Raise OperationError when a fleecing job ended: the point in time is lost."""
        for fleece in self._fleeces:
            fleece.check()

    def to_dict(self) -> dict[str, Any]:
        """The ``export --json`` document."""
        return {"domain_name": self.domain_name, "domain_uuid": self.domain_uuid,
                "point_in_time": self.point_in_time, "uris": self.uris,
                "bitmap_context": self.bitmap_context, "chain": self.chain,
                "socket": self.socket, "listen": self.address,
                "disks": [d.to_dict() for d in self.disks]}


def _check_exportable(disk: RawDisk, domain: str) -> str:
    """The disk's QEMU node; refuses disks whose writes QEMU does not see."""
    if disk.is_passthrough_lun:
        raise NotRawDiskError(disk.target, "a SCSI passthrough LUN: guest writes bypass "
                              "QEMU's block layer, so QEMU cannot export a point in time of it")
    if not disk.node_name or not disk.size:
        raise NotFoundError(f"QEMU of domain {domain} has no block node for disk {disk.target}")
    return disk.node_name


def _dirty_sources(repo: Repository, domain_uuid: str, chain_name: str,
                   selected: list[RawDisk], monitor: Monitor
                   ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Per disk, (chain bitmap, backup id) to export as dirty bitmap, or why there is none."""
    backups = repo.scan(domain_uuid).backups  # readable backups only
    chain = chain_of(backups, chain_name)
    live = bitmaps.node_bitmaps(monitor)
    found: dict[str, tuple[str, str]] = {}
    notes: dict[str, str] = {}
    for disk in selected:
        point = chain.last_point(disk.target)
        if point is not None:
            _refuse_foreign_layers(repo, backups, point)
        if point is None:
            notes[disk.target] = f"chain {chain_name} has no backup of {disk.target}"
        elif not point.record.bitmap:
            notes[disk.target] = f"backup {point.backup_id} started no dirty bitmap"
        elif not bitmaps.made_for(point.record.bitmap, repo.repo_id, chain_name,
                                  point.backup_id):
            notes[disk.target] = (f"backup {point.backup_id} names dirty bitmap "
                                  f"{point.record.bitmap!r}, not the one chain {chain_name} "
                                  "made for it")
        elif point.record.bitmap not in live.get(str(disk.node_name), {}):
            notes[disk.target] = (f"dirty bitmap {point.record.bitmap} of backup "
                                  f"{point.backup_id} is gone (the domain was restarted?)")
        elif point.record.size != disk.size:
            notes[disk.target] = f"{disk.target} was resized since backup {point.backup_id}"
        else:
            found[disk.target] = (point.record.bitmap, point.backup_id)
    for target, note in notes.items():
        log.info("disk %s: no dirty bitmap: %s", target, note)
    return found, notes


def _refuse_foreign_layers(repo: Repository, backups: list[Manifest], point: DiskPoint
                           ) -> None:
    """Raise DamagedBackupError when a layer of ``point`` has a header this tool did not
    write (a reader is told the writes since it: the point must be one of ours)."""
    store = FileStore(repo)
    for layer in lineage(backups, point.manifest, point.record.disk.target)[0]:
        problem = store.header_problem(layer.manifest, layer.record)
        if problem is not None:
            raise DamagedBackupError(layer.backup_id, problem, layer.record.disk.target)


class _Teardown:
    """Undo steps, run last-in first-out; every step runs, the first failure is kept."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self.steps.append((what, action))

    def run(self) -> RdmBackupError | None:
        first: RdmBackupError | None = None
        while self.steps:
            what, action = self.steps.pop()
            try:
                action()
            except (RdmBackupError, OSError) as err:
                log.warning("export teardown: %s: %s", what, err)
                if first is None:
                    first = err if isinstance(err, RdmBackupError) else OperationError(
                        f"{what}: {err}")
        return first


def _remove_export(monitor: Monitor, export_id: str) -> None:
    """Remove an NBD export (cutting off readers still connected) and wait until it is gone."""
    try:
        monitor.execute("block-export-del", {"id": export_id})
    except QmpError:
        monitor.execute("block-export-del", {"id": export_id, "mode": "hard"})
    retry.wait_export_removed(export_id, qmp_timeout())(lambda: not any(
        e.get("id") == export_id for e in monitor.execute("query-block-exports") or []))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class ExportOptions:
    """Where an export listens and what it offers besides the disks.

    A unix socket (``socket_path``, else one in a fresh 0700 directory under
    /run/libvirt-rdm-backup; mode 0600, root only) or TCP (``listen``,
    ``HOST:PORT``, loopback only unless ``allow_remote``). With a repository
    ``target``, each disk whose last backup in ``chain`` has a live dirty bitmap
    also gets the context ``qemu:dirty-bitmap:<name>`` with the writes since that
    backup. Scratch images of the guest's overwritten data go to ``scratch_dir``
    (default ``$RDM_BACKUP_SCRATCH_DIR`` or /var/tmp).
    """

    socket_path: str | None = None
    listen: str | None = None
    target: str | None = None
    chain: str = DEFAULT_CHAIN
    allow_remote: bool = False
    scratch_dir: str | None = None


@dataclass(frozen=True)
class _Setup:
    """What :func:`_start` sets up: the disks, their dirty-bitmap sources, the listener."""

    name: str
    uuid: str
    selected: list[RawDisk]
    nodes: dict[str, str]  # disk -> its QEMU node
    sources: dict[str, tuple[str, str]]  # disk -> (chain bitmap, backup id)
    notes: dict[str, str]  # disk -> why it has no dirty bitmap
    token: str
    temp_bitmap: str
    socket_path: str | None
    address: tuple[str, int] | None
    scratch_dir: str | None


@contextmanager
def export(conn: libvirt.virConnect, domain: str, disks: list[str],
           options: ExportOptions | None = None) -> Iterator[Export]:
    """Export a point in time of ``disks`` of a running domain over NBD, read-only
    (:class:`ExportOptions`). Everything is torn down on exit."""
    options = options or ExportOptions()
    socket_path, listen, chain = options.socket_path, options.listen, options.chain
    allow_remote, target = options.allow_remote, options.target
    if not disks:
        raise UsageError("name at least one disk to export")
    if socket_path is not None and listen is not None:
        raise UsageError("export on a unix socket or on TCP, not both")
    address = parse_listen(listen, allow_remote) if listen is not None else None
    if address is not None and not ipaddress.ip_address(address[0]).is_loopback:
        log.warning("NBD without TLS is plaintext: anyone who can reach %s can read the "
                    "exported disks, and their data crosses the network unencrypted",
                    host_port(*address))
    check_safe_name(chain, "chain name")
    repo = Repository.open(target) if target is not None else None
    ctx = open_domain(conn, domain)
    if not ctx.inventory.running:
        raise UsageError(f"domain {ctx.name} is not running: an export needs its QEMU")
    selected = select_disks(ctx.inventory, disks)
    for disk in selected:
        _check_exportable(disk, ctx.name)
    with domain_lock(ctx.uuid):
        recover_window(ctx.dom)
        monitor = LibvirtMonitor(ctx.dom)
        if remove_leftovers(monitor):
            fill_live_facts(ctx.dom, ctx.inventory)  # node names may have changed
        nodes = {d.target: _check_exportable(d, ctx.name) for d in selected}
        sources, notes = ({}, {}) if repo is None else _dirty_sources(
            repo, ctx.uuid, chain, selected, monitor)
        token = secrets.token_hex(3)
        setup = _Setup(ctx.name, ctx.uuid, selected, nodes, sources, notes, token,
                       f"{PREFIX}-dirty-{token}", socket_path, address, options.scratch_dir)
        undo = _Teardown()
        try:
            handle = _start(monitor, setup, undo)
            handle.chain = chain if repo is not None else None
            yield handle
        except BaseException:
            failed = undo.run()
            if failed is not None:
                log.error("export teardown failed after an earlier error: %s", failed)
            raise
        failed = undo.run()
        if failed is not None:
            raise failed


def _start(monitor: Monitor, setup: _Setup, undo: _Teardown) -> Export:
    """Set everything up, pushing each undo step as soon as there is something to undo."""
    fleeces, point_in_time = _fleece(monitor, setup, undo)
    listener, base, suffix, address, path = _listen(setup, undo)
    try:
        start_nbd_server(monitor, listener, object_name("nbdsock", "export", setup.token))
    finally:
        listener.close()
    undo.push("stop NBD server", lambda: monitor.execute("nbd-server-stop"))
    exported = [_add_export(monitor, setup, undo, fleece, f"{base}{fleece.disk}{suffix}")
                for fleece in fleeces]
    log.info("exporting %s of %s at %s", ", ".join(d.disk for d in exported), setup.name,
             point_in_time)
    return Export(domain_name=setup.name, domain_uuid=setup.uuid, point_in_time=point_in_time,
                  disks=exported, socket=path,
                  address=address, _fleeces=fleeces)


def _fleece(monitor: Monitor, setup: _Setup, undo: _Teardown
            ) -> tuple[list[FleecingExport], str]:
    """One fleecing job per disk, and the temporary bitmaps, in one transaction: the
    jobs and the point in time they show."""
    nodes, sources, temp_bitmap = setup.nodes, setup.sources, setup.temp_bitmap
    parent = setup.scratch_dir or os.environ.get(SCRATCH_DIR_ENV) or DEFAULT_SCRATCH_DIR
    try:
        scratch = tempfile.mkdtemp(prefix="rdmb-export-", dir=parent)
    except OSError as err:
        raise OperationError(f"cannot create a scratch directory in {parent}: "
                             f"{err.strerror}") from err
    undo.push("delete scratch directory", lambda: shutil.rmtree(scratch))
    fleeces: list[FleecingExport] = []
    actions: list[dict[str, Any]] = []
    for disk in setup.selected:
        assert disk.size is not None
        fleece = FleecingExport(monitor, nodes[disk.target], disk.target,
                                os.path.join(scratch, f"{disk.target}.qcow2"), disk.size)
        undo.push(f"remove fleecing of {disk.target}", fleece.close)
        fleece.attach()
        fleeces.append(fleece)
        if disk.target in sources:
            chain_bitmap = sources[disk.target][0]
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": fleece.scratch_node, "name": temp_bitmap,
                "granularity": bitmaps.GRANULARITY, "persistent": False, "disabled": True}})
            actions.append({"type": "block-dirty-bitmap-merge", "data": {
                "node": fleece.scratch_node, "target": temp_bitmap,
                "bitmaps": [{"node": nodes[disk.target], "name": chain_bitmap}]}})
        actions += fleece.actions()
    transaction(monitor, actions)
    point_in_time = now_iso()
    for fleece in fleeces:
        if fleece.disk in sources:
            undo.push(f"remove temporary bitmap of {fleece.disk}", partial(
                monitor.execute, "block-dirty-bitmap-remove",
                {"node": fleece.scratch_node, "name": temp_bitmap}))
    return fleeces, point_in_time


def _listen(setup: _Setup, undo: _Teardown
            ) -> tuple[socket.socket, str, str, str | None, str | None]:
    """The socket QEMU's NBD server gets: the listener, the URI's start and end, the TCP
    address and the unix socket's path (one of the two is None)."""
    address, socket_path = setup.address, setup.socket_path
    if address is not None:
        listener = tcp_listener(*address)
        bound = listener.getsockname()
        at = host_port(address[0], int(bound[1]))
        return listener, f"nbd://{at}/", "", at, None
    if socket_path is None:
        directory = private_socket_dir(SOCKET_ROOT)
        undo.push("delete socket directory", lambda: shutil.rmtree(directory))
        socket_path = os.path.join(directory, "nbd.sock")
    path = os.path.abspath(socket_path)
    listener = unix_listener(path)
    undo.push("delete socket", lambda: _unlink(path))
    return listener, "nbd+unix:///", f"?socket={path}", None, path


def _add_export(monitor: Monitor, setup: _Setup, undo: _Teardown, fleece: FleecingExport,
                uri: str) -> ExportedDisk:
    """The read-only NBD export of a disk's fleecing node (with its dirty bitmap)."""
    sources, temp_bitmap = setup.sources, setup.temp_bitmap
    options: dict[str, Any] = {"type": "nbd",
                               "id": object_name("export", fleece.disk, setup.token),
                               "node-name": fleece.scratch_node, "name": fleece.disk,
                               "writable": False}
    if fleece.disk in sources:
        options["bitmaps"] = [temp_bitmap]
    monitor.execute("block-export-add", options)
    undo.push(f"remove NBD export {fleece.disk}",
              partial(_remove_export, monitor, options["id"]))
    since = sources.get(fleece.disk)
    return ExportedDisk(
        disk=fleece.disk, size=fleece.size, uri=uri,
        dirty_since=since[1] if since else None,
        bitmap_context=BITMAP_CONTEXT_PREFIX + temp_bitmap if since else None,
        bitmap_note=setup.notes.get(fleece.disk))
