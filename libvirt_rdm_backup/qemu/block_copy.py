"""Bulk copies as QEMU block jobs on a private ``qemu-storage-daemon``.

A copy opens its source read-only and its target as block nodes of the daemon and
runs ``blockdev-mirror`` (``sync=full``) between them. The mirror reads only what
the source has allocated when the target starts out zero (a new qcow2 layer, a new
file), writes zero areas as unmapped zeroes, and the target turns all-zero writes
into unmapped zeroes too (``detect-zeroes=unmap``): a sparse source leaves a sparse
target, as ``qemu-img convert`` did. ``speed`` limits the job (bytes per second).

The job is followed through ``JOB_STATUS_CHANGE`` events and ``query-jobs`` (its
``current-progress``/``total-progress`` go to the progress callback); it is given
up (cancelled) when it makes no progress for the stall limit, reaches its
deadline, fails, or when the caller is interrupted (SIGINT, SIGTERM). Whatever
ends it, the job is cancelled and waited for, and the nodes, descriptors and
objects are removed in reverse order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, UsageError
from libvirt_rdm_backup.process import stall_timeout
from libvirt_rdm_backup.qemu.layers import held_fds
from libvirt_rdm_backup.qemu.monitor import qmp_timeout
from libvirt_rdm_backup.qemu.names import object_name

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
LOOK_EVERY = 1.0  # seconds between looks at a running copy's progress (events end a wait early)
MIN_WAIT = 0.01
CANCEL_WAIT = 5.0  # seconds a cancelled copy gets to stop before its daemon is killed
GIVE_UP_GRACE = 2.0  # seconds a daemon gets to quit after a failed copy
ENDED = ("concluded", "null")
MiB = 1 << 20


class JobHost(Protocol):
    """A QEMU process that runs the copy (the private storage daemon)."""

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, files: Sequence[int] = ()
    ) -> Any:
        """Run a QMP command and return its ``return`` value (see ``Monitor.execute``)."""
        ...

    def watch_job(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The job's ``query-jobs`` entry once its status changed or after ``timeout`` s."""
        ...


class CopyDeadlineError(OperationError):
    """A copy did not finish by its deadline; it was cancelled."""


@dataclass(frozen=True)
class Endpoint:
    """One side of a copy: blockdev options (without a node name) and what they need.

    ``objects``: ``object-add`` arguments the node refers to (TLS credentials).
    ``fd``: an open descriptor the daemon inherits (targets only); the node names it
    ``/dev/fd/N`` (:func:`fd_target`): the daemon opens the very file that was checked,
    never a path of its own. (``add-fd`` is not a command of qemu-storage-daemon 7.2.)
    """

    node: dict[str, Any]
    objects: tuple[dict[str, Any], ...] = field(default=())
    fd: int | None = None


def bwlimit_speed(mib_per_s: float | None) -> int:
    """QEMU's job ``speed`` (bytes per second) for ``--bwlimit`` MiB/s (None: 0, no limit);
    UsageError unless it is a positive number."""
    if mib_per_s is None:
        return 0
    if isinstance(mib_per_s, bool) or not isinstance(mib_per_s, int | float) \
            or not 0 < mib_per_s < float("inf"):
        raise UsageError(f"--bwlimit must be a positive number of MiB/s, not {mib_per_s!r}")
    return max(1, int(mib_per_s * MiB))


def raw_source(source: str, offset: int = 0, size: int | None = None) -> dict[str, Any]:
    """Blockdev options of raw bytes of a LUN, device or file (an ``iscsi://`` URL or a
    path), from ``offset`` and ``size`` bytes long (None: to the end); shared with the
    guest, which keeps using it (no lock taken)."""
    if source.startswith("iscsi://"):
        portal, _, rest = source.removeprefix("iscsi://").partition("/")
        target, _, lun = rest.rpartition("/")
        file: dict[str, Any] = {"driver": "iscsi", "transport": "tcp", "portal": portal,
                                "target": target, "lun": int(lun)}
    else:
        driver = "host_device" if source.startswith("/dev/") else "file"
        file = {"driver": driver, "filename": source, "locking": "off"}
    node: dict[str, Any] = {"driver": "raw", "file": file}
    if offset:
        node["offset"] = offset
    if size is not None:
        node["size"] = size
    return node


def fd_target(fd: int, is_block: bool, size: int) -> Endpoint:
    """The first ``size`` bytes of the file or block device open as ``fd``, as a raw target
    (it may be larger: the rest is not touched)."""
    return Endpoint({"driver": "raw", "size": size,
                     "file": {"driver": "host_device" if is_block else "file",
                              "filename": f"/dev/fd/{fd}"}}, fd=fd)


def copy_image(source: Endpoint, target: Endpoint, label: str, *, speed: int = 0,
               progress: ProgressCallback | None = None, deadline: float | None = None,
               stall: float | None = None) -> None:
    """Copy ``source`` onto ``target`` in a private ``qemu-storage-daemon`` (see
    :func:`block_copy`), which inherits the target's descriptor, if any, and those the
    source's node names as ``/dev/fd/N`` (layer files held open); the daemon quits when
    the copy ends, however it ends, and is killed (SIGKILL) when the tool dies."""
    from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

    if source.fd is not None:
        raise OperationError(f"copy of {label}: a source is never handed over as a descriptor")
    # the source's layer files held open and checked (``/dev/fd/N``), and the target's
    fds = held_fds(source.node) + (() if target.fd is None else (target.fd,))
    daemon = StorageDaemon(f"copy {label}", pass_fds=fds, killed_with_tool=True).start()
    try:
        block_copy(daemon, source, target, label, speed=speed, progress=progress,
                   deadline=deadline, stall=stall)
    except BaseException:
        # the target is given up: a daemon held by dead storage is not waited for long
        daemon.close(grace=GIVE_UP_GRACE)
        raise
    daemon.close()


def block_copy(host: JobHost, source: Endpoint, target: Endpoint, label: str, *,
               speed: int = 0, progress: ProgressCallback | None = None,
               deadline: float | None = None, stall: float | None = None) -> None:
    """Copy every byte of ``source`` onto ``target`` (both the same size) as a mirror job.

    ``label`` names the copy in messages and QEMU objects (a disk name); ``speed``:
    bytes per second (0: no limit); ``deadline``: a ``time.monotonic()`` value at which
    the copy is cancelled (CopyDeadlineError); ``stall``: seconds without progress
    before it is cancelled (OperationError; default: ``RDM_BACKUP_STALL_TIMEOUT``).
    """
    stall = stall_timeout() if stall is None else stall
    with ExitStack() as stack:
        src, dst = added_pair(stack, host, source, target, label)
        job_id = object_name("copy", label)
        arguments: dict[str, Any] = {"job-id": job_id, "device": src, "target": dst,
                                     "sync": "full", "auto-finalize": True,
                                     "auto-dismiss": False}
        if speed:
            arguments["speed"] = speed
        run_job(host, "blockdev-mirror", arguments, label, progress=progress, stall=stall,
                deadline=deadline)


def run_job(host: JobHost, command: str, arguments: dict[str, Any], label: str, *,
            progress: ProgressCallback | None = None, stall: float | None = None,
            deadline: float | None = None, what: str = "copy") -> None:
    """Start the job ``arguments`` name and follow it to its end, cancelled when anything
    goes wrong; OperationError ("``what`` of ``label`` failed: ...") when it fails."""
    job_id = arguments["job-id"]
    host.execute(command, arguments)
    try:
        error = follow_job(host, job_id, label, progress,
                           stall_timeout() if stall is None else stall, deadline)
    except BaseException:
        cancel(host, job_id)
        raise
    if error:
        raise OperationError(f"{what} of {label} failed: {error}")


def follow_job(host: JobHost, job_id: str, label: str, progress: ProgressCallback | None,
            stall: float, deadline: float | None) -> str | None:
    """Follow the job until it ended (dismissed; returns its error, None when it succeeded);
    raise when it stalled, ran late or vanished, or the progress callback raised."""
    moved, last_move = -1, time.monotonic()
    completing = False
    while True:  # each look waits on the job's events: no pause of its own
        now = time.monotonic()
        wait = min(LOOK_EVERY, last_move + stall - now)
        if deadline is not None:
            wait = min(wait, deadline - now)
        job = host.watch_job(job_id, max(wait, MIN_WAIT))
        if job is None:
            raise OperationError(f"copy of {label}: its QEMU job disappeared")
        current, total = int(job.get("current-progress", 0)), int(job.get("total-progress", 0))
        if progress is not None:
            progress(job_id, current, total)
        status = str(job.get("status"))
        if status in ENDED:
            host.execute("job-dismiss", {"id": job_id})
            return str(job["error"]) if job.get("error") else None
        now = time.monotonic()
        if status == "ready" and not completing:  # everything copied: end the mirror
            host.execute("job-complete", {"id": job_id})
            completing, last_move = True, now
        if current != moved:
            moved, last_move = current, now
        elif now - last_move >= stall:
            raise OperationError(f"copy of {label} made no progress for {stall:g} s "
                                 "(is the storage answering?)")
        if deadline is not None and now >= deadline:
            raise CopyDeadlineError(f"copy of {label} did not finish in time")


def cancel(host: JobHost, job_id: str) -> None:
    """Cancel the job and wait until it ended (at most :data:`CANCEL_WAIT` s, or
    :func:`qmp_timeout` when shorter: then the daemon's quit ends it); dismiss it."""
    try:
        host.execute("job-cancel", {"id": job_id})
    except RdmBackupError as err:
        log.debug("job-cancel %s: %s", job_id, err)

    def ended() -> bool:
        try:
            job = host.watch_job(job_id, LOOK_EVERY)
        except RdmBackupError:
            return True  # the daemon is gone, and the job with it
        if job is None:
            return True
        if job.get("status") not in ENDED:
            return False
        try:
            host.execute("job-dismiss", {"id": job_id})
        except RdmBackupError as err:
            log.debug("job-dismiss %s: %s", job_id, err)
        return True

    retry.job_cancel([job_id], min(CANCEL_WAIT, qmp_timeout()))(ended)


def _undo(host: JobHost, command: str, arguments: dict[str, Any]) -> None:
    """One cleanup step; a failure is logged (the daemon quits and drops it anyway)."""
    try:
        host.execute(command, arguments)
    except RdmBackupError as err:
        log.info("%s %s: %s", command, arguments, err)


def added_pair(stack: ExitStack, host: JobHost, source: Endpoint, target: Endpoint,
               label: str) -> tuple[str, str]:
    """Add the objects and nodes of a copy from ``source`` (read-only) onto ``target``
    (zeroes unmapped), each removed when ``stack`` closes: their node names."""
    added: set[str] = set()
    for obj in (*source.objects, *target.objects):
        if obj["id"] not in added:
            stack.enter_context(added_object(host, obj))
            added.add(obj["id"])
    src = stack.enter_context(added_node(host, {**source.node, "read-only": True},
                                         object_name("src", label)))
    dst = stack.enter_context(added_node(host, {**target.node, "discard": "unmap",
                                                "detect-zeroes": "unmap"},
                                         object_name("dst", label)))
    return src, dst


@contextmanager
def added_object(host: JobHost, arguments: dict[str, Any]) -> Iterator[None]:
    """A QEMU object (``object-add`` arguments) for the ``with`` block."""
    host.execute("object-add", arguments)
    try:
        yield
    finally:
        _undo(host, "object-del", {"id": arguments["id"]})


@contextmanager
def added_node(host: JobHost, options: dict[str, Any], name: str) -> Iterator[str]:
    """A block node added as ``name`` for the ``with`` block (deleted after; a failure to
    delete is logged: the daemon drops it when it quits)."""
    host.execute("blockdev-add", {**options, "node-name": name})
    try:
        yield name
    finally:
        _undo(host, "blockdev-del", {"node-name": name})
