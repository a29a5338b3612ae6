"""Capture: take one point in time of every planned disk and copy it into staging.

The sequence for a running domain:

1. prepare: target images attached to QEMU, fleecing scratch nodes added, and
   for each disk copied by a QEMU job a break-snapshot copy-before-write filter
   with a local fleecing image (:mod:`libvirt_rdm_backup.qemu.guard`), not yet
   in front of the guest device;
2. open the consistency window (guest agent freeze when asked, else a vCPU pause,
   and only when something needs it: storage snapshots, raw LUN copies, or more
   than one disk whose point QEMU fixes);
3. inside it: storage snapshots of LUNs (milliseconds each), then one QMP
   transaction that adds the new dirty bitmaps and starts the fleecing jobs of
   resyncs, then the filters go in front of their devices (the point in time of
   those disks); LUNs without a snapshot-capable agent are copied here, the
   guest held;
4. close the window; start the backup jobs (each reads its disk's point from
   the filter, never in the guest's write path), read the fleecing exports and
   the storage snapshots while the guest runs, and wait for the QEMU jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import libvirt

from libvirt_rdm_backup.consistency import Window, consistency_window
from libvirt_rdm_backup.domain.connection import is_remote
from libvirt_rdm_backup.engine.discover import offline_size
from libvirt_rdm_backup.engine.paused_copy import DEFAULT_MAX_PAUSE, needs_paused_copy, over_bound
from libvirt_rdm_backup.engine.plan import SNAPSHOT_FIRST_AGENTS, DataPath, DiskPlan
from libvirt_rdm_backup.engine.readback import readback_layer, reads_back
from libvirt_rdm_backup.engine.resync import resync_layer
from libvirt_rdm_backup.engine.sinks import Sink, create_layers
from libvirt_rdm_backup.engine.snapshot_copy import copy_into, copy_snapshot
from libvirt_rdm_backup.engine.storage_reads import (
    storage_endpoint,
    storage_nbd,
)
from libvirt_rdm_backup.errors import OperationError, RdmBackupError
from libvirt_rdm_backup.modes import WindowMethod
from libvirt_rdm_backup.qemu import bitmaps
from libvirt_rdm_backup.qemu.block_copy import CopyDeadlineError
from libvirt_rdm_backup.qemu.fleece import FleecingExport, fleecing_export
from libvirt_rdm_backup.qemu.guard import GuardedSource, explain, guarded_source
from libvirt_rdm_backup.qemu.jobs import (
    COPY_CHUNK,
    backup_action,
    cancel_jobs,
    transaction,
    wait_jobs,
)
from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor, Monitor
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.qemu.unplug import release_unplugged, unplug_check
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.storage.snapshot_agents import agent_by_name, holds_writes
from libvirt_rdm_backup.storage.snapshots import StorageSnapshot

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Capture:
    """Result of a capture: where each disk's data went and how the point was fixed."""

    files: dict[str, str]
    window: Window
    new_bitmaps: dict[str, str] = field(default_factory=dict)  # disk -> bitmap since this point
    chunk_maps: dict[str, ChunkMap] = field(default_factory=dict)  # of resynced/ranged disks
    snapshots: dict[str, StorageSnapshot] = field(default_factory=dict)  # disk -> new snapshot


def copy_from_storage(plan: DiskPlan, sink: Sink, speed: int = 0,
                      progress: ProgressCallback | None = None,
                      deadline: float | None = None) -> None:
    """Copy a disk from its storage (host device or iSCSI LUN) into its new layer, which
    the sink created beforehand (see :func:`~.snapshot_copy.copy_into`). A disk whose size
    could not be read fails here with the reason (StorageError), e.g. a source that is gone."""
    size = plan.disk.size if plan.disk.size is not None else offline_size(plan.disk)
    copy_into(sink, plan, storage_endpoint(plan.disk, size), speed, progress, deadline)


def _copy_paused(plan: DiskPlan, sink: Sink, deadline: float, max_pause: float,
                 speed: int) -> None:
    """Copy a LUN while the guest is paused; cancelled when ``deadline`` is reached (no
    progress reports: whoever gets them must not find the guest held)."""
    try:
        copy_from_storage(plan, sink, speed, deadline=deadline)
    except RdmBackupError as err:
        if isinstance(err, CopyDeadlineError) or time.monotonic() >= deadline:
            raise over_bound(plan, max_pause, err) from err
        raise


def _job_for(plan: DiskPlan, guard: GuardedSource | None, node: str, job_id: str,
             speed: int = 0, compress: bool = False,
             chunk: int = COPY_CHUNK) -> dict[str, Any]:
    """The backup job of a disk: from its point (behind the filter) into its layer.

    Without a filter (``guard`` None) the job reads the disk's node itself and its
    own copy-before-write puts the target in the guest's write path.
    """
    bitmap = plan.source_bitmap if plan.parent is not None else None
    source = str(plan.disk.node_name)
    if guard is not None:
        source, bitmap = guard.source(bitmap)
    if bitmap is None:
        return backup_action(job_id, source, node, sync="full", speed=speed, compress=compress,
                             chunk=chunk)
    return backup_action(job_id, source, node, sync="bitmap", bitmap=bitmap, speed=speed,
                         compress=compress, chunk=chunk)


def _resync(plan: DiskPlan, uri: str, run: _Run, parent_maps: dict[str, ChunkMap]) -> None:
    """Store the chunks of the disk read at ``uri`` that differ from its last backup:
    compared with the last point's chunk map, or with the point read back (no map)."""
    assert plan.parent is not None and plan.disk.size is not None
    sink = run.sink
    if reads_back(plan):  # its layer created with the others, before the window
        readback_layer(uri, run.parent_images[plan.disk.target], sink.copy_target(plan).node,
                       plan.disk.size, f"disk {plan.disk.target}", run.speed)
        return
    chunk_map, _written = resync_layer(uri, plan.disk.size, parent_maps[plan.disk.target],
                                       sink.target(plan), plan.parent.relative_data_file(),
                                       layer_format=sink.layer_format, speed=run.speed)
    run.result.chunk_maps[plan.disk.target] = chunk_map


def _flush_storage(plans: list[DiskPlan]) -> None:
    """Before the window: write back what the storage of each snapshot holds dirty, so
    that the snapshots inside the window do not wait for writeback (a loaded host)."""
    for plan in plans:
        assert plan.agent is not None
        try:
            agent_by_name(plan.agent).flush(plan.disk)
        except RdmBackupError as err:
            log.info("disk %s: no flush before the window: %s", plan.disk.target, err)


def _take_snapshots(plans: list[DiskPlan], scope: Callable[[DiskPlan], str], token: str,
                    result: Capture) -> None:
    for plan in plans:
        assert plan.agent is not None
        name = scope(plan) + token
        result.snapshots[plan.disk.target] = agent_by_name(plan.agent).snapshot(plan.disk, name)


@dataclass
class _Groups:
    """The planned disks of one capture, by how each gets its point and its data."""

    qemu: list[DiskPlan]  # backup jobs of QEMU
    fleece: list[DiskPlan]  # resyncs read through a fleecing export of QEMU
    storage: list[DiskPlan]  # copies from storage
    offline_resyncs: list[DiskPlan]  # resyncs read from storage
    snapshot: list[DiskPlan]  # copies from storage snapshots

    @classmethod
    def of(cls, plans: list[DiskPlan]) -> _Groups:
        def kind(path: DataPath, resync: bool) -> list[DiskPlan]:
            return [p for p in plans if p.path is path and (p.level == "resync") == resync]

        return cls(qemu=kind(DataPath.QEMU, False), fleece=kind(DataPath.QEMU, True),
                   storage=kind(DataPath.STORAGE, False),
                   offline_resyncs=kind(DataPath.STORAGE, True),
                   snapshot=[p for p in plans if p.path is DataPath.SNAPSHOT])


@dataclass
class _Run:
    """What one capture of a domain works with, and what QEMU has been given so far."""

    monitor: Monitor | None
    sink: Sink
    result: Capture
    new_bitmap: str
    speed: int
    fleecing: bool  # filters with local fleecing images (QEMU on this host)
    actions: list[dict[str, Any]] = field(default_factory=list)  # the one transaction
    guards: list[tuple[DiskPlan, GuardedSource, str, str]] = field(default_factory=list)
    direct_jobs: list[str] = field(default_factory=list)  # jobs without a filter
    fleeces: list[tuple[DiskPlan, FleecingExport]] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # jobs to cancel on failure
    parent_images: dict[str, dict[str, Any]] = field(default_factory=dict)  # read back, by disk

    def track(self, plan: DiskPlan) -> None:
        """Add the disk's new bitmap to the transaction, when the disk is tracked."""
        if plan.track:  # added before the point: it misses no write after it
            self.actions.append(bitmaps.add_action(str(plan.disk.node_name), self.new_bitmap))
            self.result.new_bitmaps[plan.disk.target] = self.new_bitmap


def _prepare_jobs(run: _Run, stack: ExitStack, plans: list[DiskPlan]) -> None:
    """Targets (created by :func:`create_layers`) attached and, with fleecing, filters
    prepared for the disks QEMU copies."""
    for plan in plans:
        assert run.monitor is not None and plan.disk.size is not None
        node = stack.enter_context(run.sink.attach(run.monitor, plan))
        job_id = object_name("job", plan.disk.target)
        run.track(plan)
        if not run.fleecing:
            run.actions.append(_job_for(plan, None, node, job_id, run.speed,
                                        run.sink.layer_format.compress, run.sink.copy_chunk))
            run.direct_jobs.append(job_id)
            continue
        guard = stack.enter_context(guarded_source(
            run.monitor, str(plan.disk.node_name), plan.disk.target, plan.disk.size, job_id))
        run.guards.append((plan, guard, node, job_id))


def _prepare_fleeces(run: _Run, stack: ExitStack, plans: list[DiskPlan]) -> None:
    """Fleecing exports prepared for the disks resynced from QEMU."""
    for plan in plans:
        assert run.monitor is not None and plan.disk.size is not None
        fleece = stack.enter_context(fleecing_export(FleecingExport(
            run.monitor, str(plan.disk.node_name), plan.disk.target,
            run.sink.scratch(f"{plan.disk.target}.fleece"), plan.disk.size,
            break_snapshot=run.fleecing)))
        run.track(plan)
        run.actions += fleece.actions()
        run.fleeces.append((plan, fleece))


def _in_window(run: _Run, groups: _Groups, running: bool, token: str,
               scope: Callable[[DiskPlan], str], pause_deadline: float, max_pause: float,
               progress: ProgressCallback | None) -> None:
    """The point in time: snapshots, the transaction, the filters in front of their
    devices, and the copies of LUNs that have no snapshot."""
    _take_snapshots(groups.snapshot, scope, token, run.result)
    if run.actions:
        assert run.monitor is not None
        transaction(run.monitor, run.actions)
        run.started = list(run.direct_jobs)
    for _plan, guard, _node, _job in run.guards:
        guard.insert()
    for _plan, fleece in run.fleeces:
        fleece.insert()
    for plan in groups.storage:
        if needs_paused_copy(plan, running):
            _copy_paused(plan, run.sink, pause_deadline, max_pause, run.speed)
        else:
            copy_from_storage(plan, run.sink, run.speed, progress)


def _after_window(run: _Run, groups: _Groups, parent_maps: dict[str, ChunkMap],
                  progress: ProgressCallback | None) -> None:
    """The guest running again: start the filtered jobs, read the exports and the
    snapshots, and wait for QEMU's jobs."""
    sink, result = run.sink, run.result
    if run.guards:
        assert run.monitor is not None
        compress = sink.layer_format.compress
        transaction(run.monitor, [_job_for(plan, guard, node, job_id, run.speed, compress,
                                           sink.copy_chunk)
                                  for plan, guard, node, job_id in run.guards])
        run.started += [job_id for _plan, _guard, _node, job_id in run.guards]
    for plan, fleece in run.fleeces:
        _resync(plan, fleece.export(), run, parent_maps)
        fleece.close()
    for plan in groups.offline_resyncs:
        with storage_nbd(plan.disk) as uri:
            _resync(plan, uri, run, parent_maps)
    for plan in groups.snapshot:
        chunk_map = copy_snapshot(plan, result.snapshots[plan.disk.target], sink, parent_maps,
                                  run.speed, progress, run.parent_images.get(plan.disk.target))
        if chunk_map is not None:
            result.chunk_maps[plan.disk.target] = chunk_map
    if run.monitor is not None and (run.started or run.fleeces):
        still_plugged = unplug_check(run.monitor, [p.disk for p in groups.qemu + groups.fleece])
        if run.started:
            try:
                wait_jobs(run.monitor, run.started, progress, check=still_plugged)
            except OperationError as err:
                raise explain(err) from err
            run.started = []
        still_plugged()  # unplugged just as its job or its resync ended


@dataclass
class CaptureOptions:
    """What one capture starts and builds on, and how it may hold the guest and move data."""

    new_bitmap: str  # names the bitmaps (one per tracked disk) and snapshots it starts
    parent_maps: dict[str, ChunkMap] = field(default_factory=dict)  # of the parents, by disk
    # blockdev options of the parents resyncs read back (they have no chunk map), by disk
    parent_images: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: ProgressCallback | None = None
    quiesce: str | None = None  # freeze the guest's filesystems (None: pause when needed)
    snapshot_scope: Callable[[DiskPlan], str] | None = None  # a disk's snapshot name prefix
    max_pause: float = DEFAULT_MAX_PAUSE  # seconds a LUN copied with the guest paused holds it
    monitor: Monitor | None = None  # the running domain's QMP channel (None: through libvirt)
    speed: int = 0  # bytes/s each copy may move: QEMU's jobs, storage copies, read-backs (0: none)


def capture(dom: libvirt.virDomain, running: bool, plans: list[DiskPlan], sink: Sink,
            options: CaptureOptions) -> Capture:
    """Fix one point in time for all planned disks and copy them into the ``sink``.

    On failure the new bitmaps and storage snapshots are removed again;
    existing ones are never touched, so the next backup still sees every write
    since the last good one. A LUN copied with the guest paused holds it at most
    ``options.max_pause`` seconds (then the backup fails, guest resumed).
    """
    new_bitmap, quiesce, progress = options.new_bitmap, options.quiesce, options.progress
    monitor, speed, max_pause = options.monitor, options.speed, options.max_pause
    files = {p.disk.target: sink.target(p) for p in plans if sink.local_files}
    groups = _Groups.of(plans)
    result = Capture(files=files, window=Window(method=WindowMethod.OFFLINE))
    if not running:
        monitor = None
    elif monitor is None:
        monitor = LibvirtMonitor(dom)
    with ExitStack() as stack:
        if monitor is not None:  # last, once filters and targets let go of their nodes
            stack.callback(release_unplugged, monitor,
                           [p.disk for p in plans if p.path is DataPath.QEMU])
        # QEMU on another host gets no descriptor of a local fleecing image
        run = _Run(monitor=monitor, sink=sink, result=result, new_bitmap=new_bitmap,
                   speed=speed, fleecing=running and not is_remote(dom.connect()),
                   parent_images=options.parent_images)
        # before anything is attached (and the layers of read-back resyncs, which need not
        # wait for their creation while the fleecing images grow)
        create_layers(sink, groups.qemu + groups.storage
                      + [p for p in groups.fleece + groups.offline_resyncs if reads_back(p)])
        _prepare_jobs(run, stack, groups.qemu)
        _prepare_fleeces(run, stack, groups.fleece)
        alone = _self_consistent(plans)
        hold_for_snapshots = bool(groups.snapshot) and quiesce is None and not alone
        # filters go in one by one: several disks share their point only with the guest held
        hold_for_filters = (run.fleecing and quiesce is None
                            and len(run.guards) + len(run.fleeces) > 1)
        try:
            with consistency_window(
                    dom if running else None, quiesce=quiesce,
                    pause=bool(groups.storage) or hold_for_snapshots or hold_for_filters,
                    before=lambda: _flush_storage(groups.snapshot)) as window:
                result.window = window
                if alone and window.method is WindowMethod.QMP_TRANSACTION:
                    window.method = WindowMethod.STORAGE_SNAPSHOT
                _in_window(run, groups, running, new_bitmap[-6:],
                           options.snapshot_scope or (lambda p: f"rdmb-snap-{p.disk.target}-"),
                           time.monotonic() + max_pause, max_pause, progress)
            _after_window(run, groups, options.parent_maps, progress)
        except BaseException:
            _undo(monitor, run.started, plans, result)
            raise
    return result


def _self_consistent(plans: list[DiskPlan]) -> bool:
    """True when one disk's storage snapshot alone is the point: the only disk, taken by an
    agent whose snapshot holds the guest's writes itself (RBD: QEMU's or tgtd's librbd blocks
    them and flushes while the snapshot is made), so the guest need not be held."""
    return (len(plans) == 1 and plans[0].path is DataPath.SNAPSHOT and plans[0].agent
            in SNAPSHOT_FIRST_AGENTS and holds_writes(plans[0].agent, plans[0].disk))


def _undo(monitor: Monitor | None, jobs: list[str], plans: list[DiskPlan],
          result: Capture) -> None:
    """Cancel started jobs, drop the bitmaps and snapshots this capture added (cleanup)."""
    drop_new_snapshots(plans, result)
    if monitor is None:
        return
    try:
        if jobs:
            cancel_jobs(monitor, jobs)
        nodes = {p.disk.target: str(p.disk.node_name) for p in plans}
        for disk, name in result.new_bitmaps.items():
            bitmaps.remove(monitor, nodes[disk], name)
    except RdmBackupError as err:
        log.info("cleanup after a failed capture was incomplete: %s", err)


def drop_new_snapshots(plans: list[DiskPlan], result: Capture) -> None:
    """Delete the storage snapshots a failed backup took."""
    by_disk = {p.disk.target: p for p in plans}
    for disk, snap in result.snapshots.items():
        plan = by_disk.get(disk)
        if plan is None or plan.agent is None:
            continue
        with suppress(RdmBackupError):
            agent_by_name(plan.agent).delete(plan.disk, snap)
