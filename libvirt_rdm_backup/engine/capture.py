"""Capture: take one point in time of every planned disk and copy it into staging."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import libvirt

from libvirt_rdm_backup.consistency import Window, paused
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.qemu import bitmaps, img
from libvirt_rdm_backup.qemu.blockdev import attached_image
from libvirt_rdm_backup.qemu.fleece import (
    FleecingExport,
    fleecing_export,
    qemu_nbd_server,
    resync_layer,
)
from libvirt_rdm_backup.qemu.jobs import backup_action, cancel_jobs, transaction, wait_jobs
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.repository.chunkmap import ChunkMap
from libvirt_rdm_backup.repository.store import Staging

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
DATA_FORMAT = "qcow2"


@dataclass
class Capture:
    """Result of a capture: where each disk's data went and how the point was fixed."""

    files: dict[str, str]
    window: Window
    new_bitmaps: dict[str, str] = field(default_factory=dict)  # disk -> bitmap since this point
    chunk_maps: dict[str, ChunkMap] = field(default_factory=dict)  # of resynced disks


def _is_resync(plan: DiskPlan) -> bool:
    return plan.level == "resync"


def _resync(plan: DiskPlan, uri: str, target: str, parent_maps: dict[str, ChunkMap],
            result: Capture) -> None:
    """Store the chunks of the disk read at ``uri`` that differ from its last backup."""
    assert plan.parent is not None and plan.disk.size is not None
    chunk_map, _written = resync_layer(uri, plan.disk.size, parent_maps[plan.disk.target],
                                       target, plan.parent.relative_data_file())
    result.chunk_maps[plan.disk.target] = chunk_map


def data_file_name(plan: DiskPlan) -> str:
    """File name of a disk's data inside a backup."""
    return f"{plan.disk.target}.{DATA_FORMAT}"


def copy_from_storage(plan: DiskPlan, target: str) -> None:
    """Copy a disk from its storage (host device or iSCSI LUN) into a sparse qcow2."""
    img.convert(plan.disk.source, target, source_fmt="raw", target_fmt=DATA_FORMAT, extra=["-U"])


def _job_for(plan: DiskPlan, node: str, job_id: str) -> dict[str, Any]:
    device = str(plan.disk.node_name)
    if plan.parent is None:
        return backup_action(job_id, device, node, sync="full")
    return backup_action(job_id, device, node, sync="bitmap", bitmap=plan.source_bitmap)


def capture(
    dom: libvirt.virDomain,
    running: bool,
    plans: list[DiskPlan],
    staging: Staging,
    new_bitmap: str,
    parent_maps: dict[str, ChunkMap],
    progress: ProgressCallback | None = None,
) -> Capture:
    """Fix one point in time for all planned disks and copy them into ``staging``.

    QEMU-path disks start their backup jobs, and the dirty bitmaps that track
    writes after this point, in one QMP transaction. Storage-path disks of a
    running domain are copied while its vCPUs are paused, and the transaction
    runs inside the same pause, so the whole VM has one point. On failure the
    new bitmaps (``new_bitmap``, one per tracked disk) are removed again;
    existing bitmaps are never touched, so the next backup still sees every
    write since the last good one.

    Resync disks get a fleecing export in the same transaction; they are read
    once at that point and only chunks that differ from ``parent_maps`` are stored.
    """
    files = {p.disk.target: staging.file(data_file_name(p)) for p in plans}
    qemu_plans = [p for p in plans if p.path is DataPath.QEMU and not _is_resync(p)]
    fleece_plans = [p for p in plans if p.path is DataPath.QEMU and _is_resync(p)]
    storage_plans = [p for p in plans if p.path is DataPath.STORAGE and not _is_resync(p)]
    offline_resyncs = [p for p in plans if p.path is DataPath.STORAGE and _is_resync(p)]
    result = Capture(files=files,
                     window=Window(method="offline" if not running else "qmp-transaction"))
    monitor = Monitor(dom) if running else None
    started: list[str] = []
    with ExitStack() as stack:
        actions: list[dict[str, Any]] = []
        job_ids = []
        for plan in qemu_plans:
            assert monitor is not None and plan.disk.size is not None
            path = files[plan.disk.target]
            backing = plan.parent.relative_data_file() if plan.parent else None
            img.create(path, DATA_FORMAT, plan.disk.size, backing=backing)
            options = {"backing": None} if backing else None
            node = stack.enter_context(
                attached_image(monitor, path, DATA_FORMAT, plan.disk.target, options))
            job_id = object_name("job", plan.disk.target)
            if plan.track:
                actions.append(bitmaps.add_action(str(plan.disk.node_name), new_bitmap))
                result.new_bitmaps[plan.disk.target] = new_bitmap
            actions.append(_job_for(plan, node.node_name, job_id))
            job_ids.append(job_id)
        fleeces: list[tuple[DiskPlan, FleecingExport]] = []
        for plan in fleece_plans:
            assert monitor is not None and plan.disk.size is not None
            fleece = stack.enter_context(fleecing_export(
                monitor, str(plan.disk.node_name), plan.disk.target,
                staging.file(f"{plan.disk.target}.fleece"), plan.disk.size))
            if plan.track:
                actions.append(bitmaps.add_action(str(plan.disk.node_name), new_bitmap))
                result.new_bitmaps[plan.disk.target] = new_bitmap
            actions += fleece.actions()
            fleeces.append((plan, fleece))
        pause = paused(dom) if running and storage_plans else nullcontext(None)
        try:
            with pause as pause_window:
                if actions:
                    assert monitor is not None
                    transaction(monitor, actions)
                    started = job_ids
                for plan in storage_plans:
                    copy_from_storage(plan, files[plan.disk.target])
            if pause_window is not None:
                result.window = pause_window
            for plan, fleece in fleeces:
                _resync(plan, fleece.export(), files[plan.disk.target], parent_maps, result)
                fleece.close()
            for plan in offline_resyncs:
                with qemu_nbd_server(plan.disk.source, "raw", readonly=True) as uri:
                    _resync(plan, uri, files[plan.disk.target], parent_maps, result)
            if started:
                assert monitor is not None
                wait_jobs(monitor, started, progress)
                started = []
        except BaseException:
            if monitor is not None:
                _undo(monitor, started, plans, result.new_bitmaps)
            raise
    return result


def _undo(monitor: Monitor, jobs: list[str], plans: list[DiskPlan],
          new_bitmaps: dict[str, str]) -> None:
    """Cancel started jobs and drop the bitmaps this capture added (cleanup path)."""
    try:
        if jobs:
            cancel_jobs(monitor, jobs)
        nodes = {p.disk.target: str(p.disk.node_name) for p in plans}
        for disk, name in new_bitmaps.items():
            bitmaps.remove(monitor, nodes[disk], name)
    except RdmBackupError as err:
        log.warning("cleanup after a failed capture was incomplete: %s", err)
