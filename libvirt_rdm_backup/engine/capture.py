"""Capture: take one point in time of every planned disk and copy it into staging."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import libvirt

from libvirt_rdm_backup.consistency import Window, paused
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.blockdev import attached_image
from libvirt_rdm_backup.qemu.jobs import backup_action, cancel_jobs, transaction, wait_jobs
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.repository.store import Staging

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
DATA_FORMAT = "qcow2"


@dataclass
class Capture:
    """Result of a capture: where each disk's data went and how the point was fixed."""

    files: dict[str, str]
    window: Window


def data_file_name(plan: DiskPlan) -> str:
    """File name of a disk's data inside a backup."""
    return f"{plan.disk.target}.{DATA_FORMAT}"


def copy_from_storage(plan: DiskPlan, target: str) -> None:
    """Copy a disk from its storage (host device or iSCSI LUN) into a sparse qcow2."""
    source = plan.disk.source
    img.convert(source, target, source_fmt="raw", target_fmt=DATA_FORMAT, extra=["-U"])


def capture(
    dom: libvirt.virDomain,
    running: bool,
    plans: list[DiskPlan],
    staging: Staging,
    progress: ProgressCallback | None = None,
) -> Capture:
    """Fix one point in time for all planned disks and copy them into ``staging``.

    QEMU-path disks start their backup jobs in one QMP transaction. Storage-path
    disks of a running domain are copied while its vCPUs are paused, and the
    transaction runs inside the same pause, so the whole VM has one point.
    """
    files = {p.disk.target: staging.file(data_file_name(p)) for p in plans}
    qemu_plans = [p for p in plans if p.path is DataPath.QEMU]
    storage_plans = [p for p in plans if p.path is DataPath.STORAGE]
    window = Window(method="offline" if not running else "qmp-transaction")
    monitor = Monitor(dom) if running else None
    with ExitStack() as stack:
        actions = []
        job_ids = []
        for plan in qemu_plans:
            assert monitor is not None and plan.disk.size is not None
            path = files[plan.disk.target]
            img.create(path, DATA_FORMAT, plan.disk.size)
            node = stack.enter_context(attached_image(monitor, path, DATA_FORMAT, plan.disk.target))
            job_id = object_name("job", plan.disk.target)
            actions.append(backup_action(job_id, str(plan.disk.node_name), node.node_name))
            job_ids.append(job_id)
        pause = paused(dom) if running and storage_plans else nullcontext(None)
        started: list[str] = []
        try:
            with pause as pause_window:
                if actions:
                    assert monitor is not None
                    transaction(monitor, actions)
                    started = job_ids
                for plan in storage_plans:
                    copy_from_storage(plan, files[plan.disk.target])
            if pause_window is not None:
                window = pause_window
            if started:
                assert monitor is not None
                wait_jobs(monitor, started, progress)
                started = []
        except BaseException:
            if started and monitor is not None:
                try:
                    cancel_jobs(monitor, started)
                except RdmBackupError as err:
                    log.warning("could not cancel backup jobs: %s", err)
            raise
    return Capture(files=files, window=window)
