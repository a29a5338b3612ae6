"""Reading a running disk at a point in time (fleecing), exported by QEMU over NBD.

Fleecing, as QEMU 7.2 does it: a scratch qcow2 node whose backing is the live
disk's node, and a ``blockdev-backup`` job with ``sync: "none"`` from the disk
to the scratch node. The job's copy-before-write filter copies the old contents
of a cluster into the scratch image before a guest write lands on it, so the
scratch node reads as the disk did when the job started; clusters the guest
did not write fall through to the live disk. Because the source is in the
scratch node's backing chain, QEMU makes these copies serialising with reads of
the scratch node: a reader never sees a guest write that came after the point.
QEMU's own NBD server exports the scratch node read-only.
With ``break_snapshot`` (what backups use on a local connection) the point is read
instead through the break-snapshot copy-before-write filter of
:mod:`libvirt_rdm_backup.qemu.guard`, whose ``snapshot-access`` node is exported: no
scratch file in the repository, and a failing copy breaks the point, never the guest's
write. The filter goes in front of the device by :meth:`FleecingExport.insert`, right
after the transaction that adds the new dirty bitmap.

The NBD socket: QEMU runs as ``libvirt-qemu`` and could not create a socket in
a directory only root can use. We create and bind the listening unix socket
ourselves in a fresh 0700 directory under :data:`SOCKET_ROOT`, hand it to QEMU
with ``getfd`` and start the server with ``nbd-server-start`` on an ``addr`` of
type ``fd`` (QEMU 7.2 accepts a bound socket and listens on it). Only root can
connect, and nothing has to be chowned to QEMU's user.

Such an export is read by :func:`libvirt_rdm_backup.engine.resync.resync_layer`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError, QmpError, RdmBackupError
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.blockdev import _free_fdset_id
from libvirt_rdm_backup.qemu.guard import GuardedSource
from libvirt_rdm_backup.qemu.jobs import backup_action, transaction
from libvirt_rdm_backup.qemu.monitor import Monitor, qmp_timeout
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.qemu.nbd_server import SOCKET_ROOT, private_socket_dir

log = logging.getLogger(__name__)



class FleecingExport:
    """A point-in-time NBD export of a running disk; see :func:`fleecing_export`."""

    def __init__(
        self,
        monitor: Monitor,
        node_name: str,
        disk: str,
        scratch_path: str,
        size: int,
        socket_root: str = SOCKET_ROOT,
        break_snapshot: bool = False,
    ) -> None:
        self.monitor = monitor
        self.node_name = node_name
        self.disk = disk
        self.scratch_path = scratch_path
        self.size = size
        self.socket_root = socket_root
        token = secrets.token_hex(3)
        self.scratch_node = object_name("fleece", disk, token)
        self.job_id = object_name("fleecejob", disk, token)
        self.export_name = object_name("export", disk, token)
        self._fd_name = object_name("nbdsock", disk, token)
        self._file_created = False
        self._fdset_id: int | None = None
        self._node_added = False
        self._server_started = False
        self._export_added = False
        self._socket_dir: str | None = None
        self._uri: str | None = None
        # the point read through a break-snapshot filter (local fleecing image) instead
        self._guard = GuardedSource(monitor, node_name, disk, size) if break_snapshot else None

    @property
    def uri(self) -> str:
        """``nbd+unix:///EXPORT?socket=PATH`` (after :meth:`export`)."""
        if self._uri is None:
            raise OperationError("the fleecing export is not started")
        return self._uri

    def attach(self) -> None:
        """Create the scratch image and add it to QEMU as a node backed by the disk."""
        if self._guard is not None:
            self._node_added = True  # what attach leaves on failure goes with close()
            self._guard.attach()
            return
        try:
            fd = os.open(
                self.scratch_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as err:
            raise OperationError(
                f"cannot create scratch image {self.scratch_path}: {err.strerror}"
            ) from err
        os.close(fd)
        self._file_created = True
        img.create(self.scratch_path, "qcow2", self.size)
        fd = os.open(self.scratch_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fdset_id = _free_fdset_id(self.monitor)
            self.monitor.execute(
                "add-fd", {"fdset-id": fdset_id, "opaque": self.scratch_node}, files=[fd]
            )
            self._fdset_id = fdset_id
        finally:
            os.close(fd)
        self.monitor.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": self.scratch_node,
                "discard": "unmap",
                "detect-zeroes": "unmap",
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset_id}"},
                "backing": self.node_name,
            },
        )
        self._node_added = True

    def actions(self) -> list[dict[str, Any]]:
        """The transaction actions that fix the point in time (``blockdev-backup`` sync=none).

        Put them into the same QMP ``transaction`` as the dirty-bitmap-add of the
        next incremental backup, then call :meth:`export`.
        """
        if self._guard is not None:
            return []
        return [backup_action(self.job_id, self.node_name, self.scratch_node, sync="none")]

    def insert(self) -> None:
        """Right after :meth:`actions` ran: fix the point of a break-snapshot filter."""
        if self._guard is not None:
            self._guard.insert()

    def start(self) -> str:
        """Run :meth:`actions` in a transaction of their own, then :meth:`export`."""
        transaction(self.monitor, self.actions())
        self.insert()
        return self.export()

    def export(self) -> str:
        """Start QEMU's NBD server on our socket and export the scratch node read-only."""
        self._socket_dir = private_socket_dir(self.socket_root)
        path = os.path.join(self._socket_dir, "nbd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(path)
                listener.listen(16)
            except OSError as err:
                raise OperationError(f"cannot listen on {path}: {err.strerror}") from err
            start_nbd_server(self.monitor, listener, self._fd_name)
        finally:
            listener.close()
        self._server_started = True
        self.monitor.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": self.export_name,
                "node-name": (self.scratch_node if self._guard is None
                              else self._guard.source(None)[0]),
                "name": self.export_name,
                "writable": False,
            },
        )
        self._export_added = True
        self._uri = f"nbd+unix:///{self.export_name}?socket={path}"
        return self._uri

    def check(self) -> None:
        """Raise OperationError unless the fleecing job still runs (the point is intact)."""
        if self._guard is not None:
            return  # a broken point is seen by its reads, which fail
        jobs = {str(j["id"]): j for j in self.monitor.execute("query-jobs") or []}
        state = jobs.get(self.job_id)
        if state is None:
            raise OperationError(f"fleecing job {self.job_id} is gone")
        if state.get("status") not in ("running", "ready", "paused", "standby"):
            raise OperationError(
                f"fleecing job {self.job_id} is {state.get('status')}: "
                f"{state.get('error') or 'no error given'}"
            )

    def close(self) -> None:
        """Tear down in reverse order; every step runs, the first failure is raised."""
        errors: list[RdmBackupError] = []

        def step(what: str, action: Callable[[], None]) -> None:
            try:
                action()
            except RdmBackupError as err:
                log.warning("fleecing teardown: %s: %s", what, err)
                errors.append(err)
            except OSError as err:
                log.warning("fleecing teardown: %s: %s", what, err)
                errors.append(OperationError(f"{what}: {err}"))

        if self._export_added:
            step("remove NBD export", self._remove_export)
        if self._server_started:
            step("stop NBD server", self._stop_server)
        if self._node_added and self._guard is not None:
            step("remove copy-before-write filter", self._remove_guard)
        elif self._node_added:
            step("stop fleecing job", self._stop_job)
            step("remove scratch node", self._remove_node)
        if self._fdset_id is not None:
            step("remove fd set", self._remove_fdset)
        if self._file_created:
            step("delete scratch image", self._delete_scratch)
        if self._socket_dir is not None:
            step("delete socket directory", self._delete_socket_dir)
        self._uri = None
        if errors:
            raise errors[0]

    def _remove_export(self) -> None:
        try:
            self.monitor.execute("block-export-del", {"id": self.export_name})
        except QmpError:
            self.monitor.execute("block-export-del", {"id": self.export_name, "mode": "hard"})
        retry.wait_export_removed(self.export_name, qmp_timeout())(
            lambda: not any(e.get("id") == self.export_name
                            for e in self.monitor.execute("query-block-exports") or []))
        self._export_added = False

    def _stop_server(self) -> None:
        self.monitor.execute("nbd-server-stop")
        self._server_started = False

    def _stop_job(self) -> None:
        cancelled = False

        def gone() -> bool:
            nonlocal cancelled
            jobs = {str(j["id"]): j for j in self.monitor.execute("query-jobs") or []}
            state = jobs.get(self.job_id)
            if state is None:
                return True
            status = state.get("status")
            if status in ("concluded", "null"):
                self.monitor.execute("job-dismiss", {"id": self.job_id})
                if not cancelled and state.get("error"):
                    raise OperationError(
                        f"fleecing job {self.job_id} failed: {state.get('error')}"
                    )
                return True
            if not cancelled and status != "aborting":
                self.monitor.execute("job-cancel", {"id": self.job_id})
                cancelled = True
            return False

        retry.job_stop(self.job_id, qmp_timeout())(gone)

    def _remove_guard(self) -> None:
        assert self._guard is not None
        self._guard.close(None)
        self._node_added = False

    def _remove_node(self) -> None:
        self.monitor.execute("blockdev-del", {"node-name": self.scratch_node})
        self._node_added = False

    def _remove_fdset(self) -> None:
        self.monitor.execute("remove-fd", {"fdset-id": self._fdset_id})
        self._fdset_id = None

    def _delete_scratch(self) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.scratch_path)
        self._file_created = False

    def _delete_socket_dir(self) -> None:
        assert self._socket_dir is not None
        shutil.rmtree(self._socket_dir)
        self._socket_dir = None


def start_nbd_server(monitor: Monitor, listener: socket.socket, fd_name: str) -> None:
    """Start QEMU's NBD server on ``listener``, a bound, listening socket of ours.

    The socket (unix or TCP) goes to QEMU with ``getfd`` as ``fd_name`` and
    ``nbd-server-start`` listens on it (``addr`` of type ``fd``); the caller
    closes its own copy. QEMU runs one NBD server per process: one already
    running (another backup, a libvirt pull-mode backup) is an OperationError.
    """
    try:
        monitor.execute("getfd", {"fdname": fd_name}, files=[listener.fileno()])
    except OSError as err:
        raise OperationError(f"cannot pass the NBD socket to QEMU: {err.strerror}") from err
    try:
        monitor.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": fd_name}}})
    except QmpError as err:
        with suppress(RdmBackupError):
            monitor.execute("closefd", {"fdname": fd_name})
        if "already running" in err.desc:
            raise OperationError(
                "QEMU already runs an NBD server for this domain (another backup, or a "
                "libvirt pull-mode backup); it is not ours to use or stop"
            ) from err
        raise


@contextmanager
def fleecing_export(fleece: FleecingExport) -> Iterator[FleecingExport]:
    """Prepare ``fleece``, a point-in-time export of a block node of a running domain.

    On entry its scratch image (a new file of the disk's size) is created and added to
    QEMU backed by the disk. The caller then runs :meth:`FleecingExport.actions` in its
    QMP transaction (or calls :meth:`FleecingExport.start`) and
    :meth:`FleecingExport.export` for the NBD URI. On exit everything is removed again:
    export, NBD server, job, node, fd set, scratch image and socket directory; a
    teardown failure never hides the body's exception (it is logged), else the first
    one is raised.
    """
    try:
        fleece.attach()
        yield fleece
    except BaseException:
        try:
            fleece.close()
        except RdmBackupError as err:
            log.error("fleecing teardown failed after an earlier error: %s", err)
        raise
    fleece.close()
