"""``mount``: the filesystems of a backup point, read-only under a directory, without a copy.

A small supervisor process (double fork, its own session) serves the point on a unix
socket in the mount's private run directory (:mod:`.serve`), presents it as a file
through ``nbdfuse``, finds the partitions and mounts each filesystem read-only through
a read-only loop device (:mod:`~libvirt_rdm_backup.partitions`,
:mod:`~libvirt_rdm_backup.loopmount`). Each piece is recorded in the state file
(:mod:`.mount_state`) as soon as it exists. The command returns once everything is
mounted, with the listing the supervisor sent back; the supervisor keeps running until
``umount`` (:mod:`.unmount`) or SIGINT/SIGTERM, and then undoes everything itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup import loopmount, partitions, retry
from libvirt_rdm_backup.engine import mount_state, unmount
from libvirt_rdm_backup.engine.mount_state import MountState, Piece, Proc
from libvirt_rdm_backup.engine.serve import Served, ServeRequest, serve_point
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    UsageError,
    VerificationError,
)

log = logging.getLogger(__name__)

ERRORS: dict[int, type[RdmBackupError]] = {2: UsageError, 3: NotFoundError,
                                           5: VerificationError}


@dataclass
class Listed:
    """One partition (or the whole disk) of a mount: mounted, or why not."""

    name: str
    fstype: str | None
    offset: int
    size: int
    path: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fstype": self.fstype, "offset": self.offset,
                "size": self.size, "mounted": self.path is not None, "path": self.path,
                "reason": self.reason}


@dataclass
class MountListing:
    """What ``mount`` did: the point, and each partition."""

    mountpoint: str
    backup_id: str
    domain: str
    disk: str
    size: int
    verified: bool
    partition_table: str | None
    supervisor_pid: int
    state_file: str
    partitions: list[Listed] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``mount --json`` document."""
        return {"mountpoint": self.mountpoint, "backup_id": self.backup_id,
                "domain": self.domain, "disk": self.disk, "size": self.size,
                "verified": self.verified, "partition_table": self.partition_table,
                "supervisor_pid": self.supervisor_pid, "state_file": self.state_file,
                "partitions": [p.to_dict() for p in self.partitions]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MountListing:
        parts = [Listed(p["name"], p["fstype"], p["offset"], p["size"], p["path"],
                        p["reason"]) for p in data["partitions"]]
        fields = {k: v for k, v in data.items() if k != "partitions"}
        return cls(**fields, partitions=parts)


def check_mountpoint(mountpoint: str, root: str = mount_state.MOUNTS_DIR) -> str:
    """The real path of a usable mountpoint: an existing empty directory that nothing is
    mounted on and no mount of ours uses (UsageError otherwise)."""
    real = os.path.realpath(mountpoint)
    if not os.path.isdir(real):
        raise UsageError(f"mountpoint {mountpoint} is not an existing directory")
    if os.path.ismount(real):
        raise UsageError(f"mountpoint {mountpoint} is busy: something is mounted on it")
    if os.listdir(real):
        raise UsageError(f"mountpoint {mountpoint} is busy: the directory is not empty")
    if os.path.lexists(mount_state.state_path(real, root)):
        raise UsageError(f"mountpoint {mountpoint} is busy: a mount of rdm-backup uses it "
                         f"(rdm-backup umount {mountpoint})")
    if real == root or real.startswith(os.path.dirname(root) + "/"):
        raise UsageError(f"mountpoint {mountpoint} is inside rdm-backup's run directory")
    return real


def mount(request: ServeRequest, mountpoint: str,
          root: str = mount_state.MOUNTS_DIR) -> MountListing:
    """Mount the point's filesystems under ``mountpoint`` and return the listing; a
    supervisor process keeps them mounted until ``umount``. The errors of serving
    (:func:`.serve.serve_point`) and of mounting come back as they were raised."""
    real = check_mountpoint(mountpoint, root)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the first child only forks the supervisor
        code = 0
        try:
            os.close(reading)
            os.setsid()
            if os.fork() == 0:
                code = _supervise(request, real, root, writing)
        finally:
            os._exit(code)
    os.close(writing)
    os.waitpid(child, 0)
    with os.fdopen(reading, "rb") as stream:
        try:
            line = stream.readline()
        except BaseException:  # interrupted: the supervisor undoes what it made
            _stop_supervisor(real, root)
            raise
    if not line:
        raise OperationError("the mount's supervisor ended before it reported")
    answer = json.loads(line)
    if "error" in answer:
        raise ERRORS.get(int(answer["exit_code"]), OperationError)(str(answer["error"]))
    return MountListing.from_dict(answer)


def _stop_supervisor(mountpoint: str, root: str) -> None:
    """SIGTERM to the supervisor of the mount at ``mountpoint``, once its state file names
    it (checked); nothing when it does not yet."""
    try:
        supervisor = retry.until(10.0, 0.1, "no state")(
            lambda: _recorded_supervisor(mountpoint, root))
    except RdmBackupError:
        return
    if supervisor is not None:
        loopmount.stop_process(supervisor.pid)


def _recorded_supervisor(mountpoint: str, root: str) -> Proc | None:
    try:
        return mount_state.load(mountpoint, root).supervisor
    except UsageError:
        return None


def _detach_from_caller() -> None:
    """The supervisor keeps nothing of the command: no terminal, no working directory, no
    inherited descriptors besides the report pipe (closed by the caller), quiet output."""
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _supervise(request: ServeRequest, mountpoint: str, root: str, report: int) -> int:
    """The supervisor: set up, report, serve until a signal or the daemon's end, undo."""
    _detach_from_caller()
    os.closerange(3, report)
    os.closerange(report + 1, 1 << 16)
    me = Proc(os.getpid(), loopmount.process_start(os.getpid()) or 1)
    state = MountState(mountpoint, mount_state.run_dir(mountpoint, root), me,
                       disk=request.disk)
    stop: list[int] = []

    def note(signum: int, _frame: object) -> None:
        stop.append(signum)

    reported = made = False
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.mkdir(state.run_dir, 0o700)
        made = True
        mount_state.save(state, root)
        request = dataclasses.replace(request, socket=state.socket, listen=None)
        with serve_point(request) as served:
            state.backup_id = served.backup_id
            try:
                listing = _set_up(state, served, root)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, note)
                _send(report, listing.to_dict())
                reported = True
                _serve_until_stopped(served, stop)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, note)
                _undo(state, root)
        return 0
    except (RdmBackupError, OSError, KeyboardInterrupt) as err:
        if not reported:
            _send(report, _error(err))
        return 1
    finally:
        if made:
            unmount.remove_run_dir(state)
            mount_state.remove(state, root)


def _error(err: BaseException) -> dict[str, Any]:
    if isinstance(err, RdmBackupError):
        return {"error": str(err), "exit_code": err.exit_code}
    if isinstance(err, OSError):
        return {"error": f"{err.filename or 'mount'}: {err.strerror or err}", "exit_code": 4}
    return {"error": "interrupted, the operation did not complete", "exit_code": 4}


def _send(report: int, document: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(report, json.dumps(document).encode() + b"\n")
        os.close(report)


def _serve_until_stopped(served: Served, stop: list[int]) -> None:
    """Until a signal arrives, or the daemon stops serving (logged: nobody is listening)."""
    next_check = time.monotonic() + 1.0

    def stopped() -> bool:
        nonlocal next_check
        if not stop and time.monotonic() >= next_check:
            try:
                served.check()
            except RdmBackupError as err:
                log.error("%s", err)
                return True
            next_check = time.monotonic() + 1.0
        return bool(stop)

    retry.serve_until_stopped(None)(stopped)


def _undo(state: MountState, root: str) -> None:
    """Everything the supervisor made, in reverse (busy filesystems detached lazily)."""
    done = unmount.Undone(state.mountpoint)
    with contextlib.suppress(RdmBackupError, OSError):
        unmount.undo_filesystems(state, done, lazy=True, root=root)
    with contextlib.suppress(RdmBackupError, OSError):
        unmount.undo_fuse(state, lazy=True)


def _set_up(state: MountState, served: Served, root: str) -> MountListing:
    """nbdfuse, then each partition's loop device and mount; the state follows each step."""
    os.mkdir(state.fuse_dir, 0o700)
    pidfile = os.path.join(state.run_dir, "nbdfuse.pid")
    fuse = loopmount.start_nbdfuse(state.disk_file, served.uri, pidfile)
    state.nbdfuse = Proc(fuse.pid, loopmount.process_start(fuse.pid) or 1)
    mount_state.save(state, root)
    label, found = partitions.areas(state.disk_file, served.size)
    listing = MountListing(state.mountpoint, served.backup_id, served.domain, served.disk,
                           served.size, served.verified, label, state.supervisor.pid,
                           mount_state.state_path(state.mountpoint, root))
    for area in found:
        listed = Listed(area.name, area.fstype, area.offset, area.size)
        listed.reason = area.not_mountable()
        if listed.reason is None:
            try:
                listed.path = _mount_area(state, area, root)
            except RdmBackupError as err:
                listed.reason = f"not mounted: {err}"
        listing.partitions.append(listed)
    return listing


def _mount_area(state: MountState, area: partitions.Area, root: str) -> str:
    """A read-only loop device over the area and its filesystem mounted; where."""
    options = area.mount_options()
    assert options is not None and area.fstype is not None
    device = loopmount.attach_loop(state.disk_file, area.offset, area.size)
    piece = Piece(area.name, device, os.path.join(state.mountpoint, area.name), area.offset,
                  area.size)
    state.pieces.append(piece)
    mount_state.save(state, root)
    try:
        os.mkdir(piece.path, 0o755)
        loopmount.mount_read_only(device, area.fstype, options, piece.path)
    except (RdmBackupError, OSError) as err:
        with contextlib.suppress(OSError):
            os.rmdir(piece.path)
        loopmount.detach_loop(device)
        state.pieces.remove(piece)
        mount_state.save(state, root)
        if isinstance(err, OSError):
            raise OperationError(f"{piece.path}: {err.strerror}") from err
        raise
    piece.mounted = True
    mount_state.save(state, root)
    return piece.path
