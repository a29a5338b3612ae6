"""Push backup with fleecing: the guest's writes never wait for, or fail with, the target.

A plain ``blockdev-backup`` job copies old data straight to the backup target
before a guest write may land, and by default a failed copy fails the guest's
write: a full repository or a stalled NBD server would become the guest's I/O
error or latency. Instead, for each disk:

- a local fleecing image (qcow2, passed to QEMU as a descriptor and unlinked at
  once, so it never outlives QEMU's use of it) receives the old data;
- QEMU's explicit ``copy-before-write`` filter sits between the guest device and
  the disk's node, with ``on-cbw-error=break-snapshot`` and a ``cbw-timeout``:
  when the fleecing image cannot take a copy in time, the point in time breaks
  (the backup fails), the guest's write goes on;
- the backup job reads a ``snapshot-access`` node of that filter (the disk as it
  was when the filter was put in front of the device) and writes the target.

Putting the filter in front of the device (``qom-set`` of its ``drive``) fixes
the point in time. Tearing down never drains the disk while a job may still be
waiting for its target (a drain would wait with it and stall the guest): a job
that does not stop leaves the filter in place, still harmless, for the next run
(:func:`restore_drives`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from libvirt_rdm_backup.errors import OperationError, QmpError, RdmBackupError
from libvirt_rdm_backup.process import env_seconds
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.blockdev import _free_fdset_id
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import PREFIX, object_name

log = logging.getLogger(__name__)

FLEECE_ROOT_ENV = "RDM_BACKUP_SCRATCH_DIR"
CBW_TIMEOUT_ENV = "RDM_BACKUP_CBW_TIMEOUT"
DEFAULT_CBW_TIMEOUT = 30.0  # seconds a guest write may wait for its copy into the fleecing image
ACTIVE_JOB = ("created", "running", "paused", "ready", "standby", "waiting", "pending",
              "aborting")


def fleece_root() -> str:
    """Local directory of fleecing images (``RDM_BACKUP_SCRATCH_DIR``, else /var/tmp)."""
    return os.environ.get(FLEECE_ROOT_ENV, "/var/tmp")


def cbw_timeout() -> int:
    """Whole seconds a guest write may wait for its copy (``RDM_BACKUP_CBW_TIMEOUT``)."""
    return max(1, round(env_seconds(CBW_TIMEOUT_ENV, DEFAULT_CBW_TIMEOUT)))


class GuardedSource:
    """One disk behind a break-snapshot copy-before-write filter; see the module."""

    def __init__(self, monitor: Monitor, node_name: str, disk: str, size: int) -> None:
        self.monitor = monitor
        self.node_name = node_name
        self.qdev = _device_of(monitor, node_name)
        self.disk = disk
        self.size = size
        self.fleece_node = object_name("fleece", disk)
        self.filter_node = object_name("cbw", disk)
        self.access_node = object_name("access", disk)
        self.copy_bitmap = object_name("copy", disk)
        self._fdset_id: int | None = None
        self._added: list[str] = []
        self._inserted = False

    def attach(self) -> None:
        """Create the fleecing image and add it and the (not yet active) filter to QEMU."""
        try:
            tmp = tempfile.mkdtemp(prefix="rdmb-fleece-", dir=fleece_root())
        except OSError as err:
            raise OperationError(f"cannot create a fleecing image in {fleece_root()}: "
                                 f"{err.strerror}") from err
        path = os.path.join(tmp, "fleece.qcow2")
        try:
            img.create(path, "qcow2", self.size)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        finally:
            with suppress(OSError):
                os.unlink(path)
            with suppress(OSError):
                os.rmdir(tmp)
        try:
            fdset_id = _free_fdset_id(self.monitor)
            self.monitor.execute("add-fd", {"fdset-id": fdset_id, "opaque": self.fleece_node},
                                 files=[fd])
            self._fdset_id = fdset_id
        finally:
            os.close(fd)
        self._add({"driver": "qcow2", "node-name": self.fleece_node, "discard": "unmap",
                   "file": {"driver": "file", "filename": f"/dev/fdset/{self._fdset_id}"},
                   "backing": None})
        self._add({"driver": "copy-before-write", "node-name": self.filter_node,
                   "file": self.node_name, "target": self.fleece_node,
                   "on-cbw-error": "break-snapshot", "cbw-timeout": cbw_timeout()})

    def _add(self, node: dict[str, Any]) -> None:
        self.monitor.execute("blockdev-add", node)
        self._added.append(str(node["node-name"]))

    def insert(self) -> None:
        """Put the filter in front of the guest device: this is the point in time."""
        self.monitor.execute("qom-set", {"path": self.qdev, "property": "drive",
                                         "value": self.filter_node})
        self._inserted = True

    def source(self, bitmap: str | None) -> tuple[str, str | None]:
        """The node the backup job reads (and its bitmap of ``bitmap``'s writes, if given).

        The disk's ``bitmap`` is merged after the point in time: it may hold a few
        writes made since, which only makes the job copy a little more of the
        (unchanged) point.
        """
        self._add({"driver": "snapshot-access", "node-name": self.access_node,
                   "file": self.filter_node})
        if bitmap is None:
            return self.access_node, None
        self.monitor.execute("block-dirty-bitmap-add", {
            "node": self.access_node, "name": self.copy_bitmap, "persistent": False,
            "granularity": self._granularity(bitmap)})
        self.monitor.execute("block-dirty-bitmap-merge", {
            "node": self.access_node, "target": self.copy_bitmap,
            "bitmaps": [{"node": self.node_name, "name": bitmap}]})
        return self.access_node, self.copy_bitmap

    def _granularity(self, bitmap: str) -> int:
        for node in self.monitor.execute("query-named-block-nodes", {"flat": True}) or []:
            if node.get("node-name") == self.node_name:
                for entry in node.get("dirty-bitmaps") or []:
                    if entry.get("name") == bitmap:
                        return int(entry["granularity"])
        raise OperationError(f"disk {self.disk}: dirty bitmap {bitmap} is gone")

    def close(self, job_id: str | None) -> None:
        """Take everything away again, unless job ``job_id`` still runs (then leave it)."""
        if job_id is not None and _job_active(self.monitor, job_id):
            log.warning("disk %s: the backup job does not stop (its target is not answering); "
                        "its copy-before-write filter stays until the next run removes it",
                        self.disk)
            return
        errors: list[RdmBackupError] = []
        if self.access_node in self._added:
            self._delete(self.access_node, errors)
        if self._inserted:
            try:
                self.monitor.execute("qom-set", {"path": self.qdev, "property": "drive",
                                                 "value": self.node_name})
                self._inserted = False
            except QmpError as err:
                if err.error_class == "DeviceNotFound":  # unplugged: nothing uses the filter
                    self._inserted = False
                else:
                    errors.append(err)
            except RdmBackupError as err:
                errors.append(err)
        if not self._inserted:
            for node in reversed([n for n in self._added if n != self.access_node]):
                self._delete(node, errors)
        if self._fdset_id is not None and not self._added:
            with suppress(RdmBackupError):
                self.monitor.execute("remove-fd", {"fdset-id": self._fdset_id})
            self._fdset_id = None
        if errors:
            raise errors[0]

    def _delete(self, node: str, errors: list[RdmBackupError]) -> None:
        try:
            self.monitor.execute("blockdev-del", {"node-name": node})
            self._added.remove(node)
        except RdmBackupError as err:
            errors.append(err)


def explain(err: OperationError) -> OperationError:
    """A job's failure reading a broken point, said as such (the reads fail with EACCES)."""
    if "Permission denied" not in str(err):
        return err
    return OperationError(
        f"{err}: the point in time was given up because copying old data into the local "
        f"fleecing image (in {fleece_root()}) failed or took over {cbw_timeout()} s; "
        "the guest's writes went on")


def _device_of(monitor: Monitor, node_name: str) -> str:
    """The qdev path of the guest device whose drive is ``node_name``."""
    for entry in monitor.execute("query-block") or []:
        if (entry.get("inserted") or {}).get("node-name") == node_name and entry.get("qdev"):
            return str(entry["qdev"])
    raise OperationError(f"no guest device uses block node {node_name}")


def _job_active(monitor: Monitor, job_id: str) -> bool:
    return any(str(j.get("id")) == job_id and j.get("status") in ACTIVE_JOB
               for j in monitor.execute("query-jobs") or [])


@contextmanager
def guarded_source(monitor: Monitor, node_name: str, disk: str, size: int,
                   job_id: str) -> Iterator[GuardedSource]:
    """A :class:`GuardedSource` attached for the context's life (see its methods)."""
    guard = GuardedSource(monitor, node_name, disk, size)
    try:
        guard.attach()
        yield guard
    except BaseException:
        try:
            guard.close(job_id)
        except RdmBackupError as err:
            log.info("removing the copy-before-write filter of %s after an error: %s",
                     disk, err)
        raise
    guard.close(job_id)


def restore_drives(monitor: Monitor) -> list[str]:
    """Give guest devices that a killed run left behind our filter their own node again."""
    graph = monitor.execute("x-debug-query-block-graph") or {}
    names = {int(n["id"]): str(n.get("name", "")) for n in graph.get("nodes") or []}
    file_child = {names.get(int(e["parent"])): names.get(int(e["child"]))
                  for e in graph.get("edges") or [] if e.get("name") == "file"}
    restored = []
    for entry in monitor.execute("query-block") or []:
        inserted = entry.get("inserted") or {}
        node = str(inserted.get("node-name", ""))
        below = file_child.get(node)
        if not node.startswith(f"{PREFIX}-cbw-") or not below:
            continue
        qdev = str(entry.get("qdev") or "")
        try:
            monitor.execute("qom-set", {"path": qdev, "property": "drive", "value": below})
            restored.append(f"drive of {qdev}")
        except RdmBackupError as err:
            log.warning("could not put %s back in front of %s: %s", below, qdev, err)
    return restored
