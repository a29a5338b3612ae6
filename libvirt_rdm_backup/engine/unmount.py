"""Undo a ``mount``: unmount each filesystem, detach its loop device, unmount the ``nbdfuse``
file, stop the supervisor (which stops serving), remove the run directory and the state.

Each step is done only to what the checked state file names (:mod:`.mount_state`) and
is skipped when already undone, so that it can run again after a failure, or after the
supervisor died. A busy filesystem stops ``umount`` before anything else is undone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup import loopmount
from libvirt_rdm_backup.engine import mount_state
from libvirt_rdm_backup.engine.mount_state import MountState
from libvirt_rdm_backup.errors import CommandError, OperationError

log = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0  # seconds the supervisor (and nbdfuse) get to exit


@dataclass
class Undone:
    """What :func:`undo` took down."""

    mountpoint: str
    unmounted: list[str] = field(default_factory=list)
    loop_devices: list[str] = field(default_factory=list)
    supervisor_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ``umount --json`` document."""
        return {"mountpoint": self.mountpoint, "unmounted": self.unmounted,
                "loop_devices": self.loop_devices,
                "supervisor_stopped": self.supervisor_stopped}


def undo_filesystems(state: MountState, done: Undone, lazy: bool = False,
                     root: str = mount_state.MOUNTS_DIR) -> None:
    """Unmount each filesystem and detach its loop device, newest first; the state file
    follows each step. OperationError naming a busy filesystem (unless ``lazy``: then it
    is detached from the tree at once and goes when its last user does)."""
    for piece in reversed(list(state.pieces)):
        attached = mount_state.our_loop(state, piece)
        if loopmount.is_mountpoint(piece.path):
            try:
                loopmount.unmount(piece.path)
            except CommandError as err:
                if not lazy:
                    raise OperationError(f"cannot unmount {piece.path}: {err}; nothing "
                                         "more was undone") from err
                log.warning("%s is busy: detached lazily", piece.path)
                loopmount.unmount(piece.path, lazy=True)
            done.unmounted.append(piece.path)
        with contextlib.suppress(OSError):
            os.rmdir(piece.path)  # made by the mount; kept if someone put files there
        if attached:
            loopmount.detach_loop(piece.device)
            done.loop_devices.append(piece.device)
        state.pieces.remove(piece)
        mount_state.save(state, root)


def undo_fuse(state: MountState, lazy: bool = False) -> None:
    """Unmount the ``nbdfuse`` file (nbdfuse then exits); a recorded nbdfuse that is still
    there is stopped."""
    if loopmount.is_mountpoint(state.fuse_dir):
        try:
            loopmount.unmount(state.fuse_dir)
        except CommandError:
            if not lazy:
                raise
            loopmount.unmount(state.fuse_dir, lazy=True)
    fuse = state.nbdfuse
    if fuse is not None and mount_state.alive(fuse) and \
            not loopmount.wait_gone(fuse.pid, fuse.start, 10):
        loopmount.stop_process(fuse.pid)
        loopmount.wait_gone(fuse.pid, fuse.start, STOP_TIMEOUT)


def remove_run_dir(state: MountState) -> None:
    """The mount's private run directory (socket, pid file, empty FUSE directory)."""
    if not loopmount.is_mountpoint(state.fuse_dir):
        shutil.rmtree(state.run_dir, ignore_errors=True)


def umount(mountpoint: str, root: str = mount_state.MOUNTS_DIR) -> Undone:
    """Undo the mount at ``mountpoint`` (UsageError: not a mount of ours, or a state file
    that is refused; OperationError: a filesystem is busy, or a piece would not go)."""
    state = mount_state.load(mountpoint, root)
    done = Undone(state.mountpoint)
    undo_filesystems(state, done, root=root)
    undo_fuse(state)
    supervisor = state.supervisor
    if mount_state.alive(supervisor):
        loopmount.stop_process(supervisor.pid)
        if not loopmount.wait_gone(supervisor.pid, supervisor.start, STOP_TIMEOUT):
            raise OperationError(f"the supervisor of {mountpoint} (pid {supervisor.pid}) "
                                 f"did not stop within {STOP_TIMEOUT:g} s")
        done.supervisor_stopped = True
    remove_run_dir(state)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mount_state.state_path(state.mountpoint, root))
    return done
