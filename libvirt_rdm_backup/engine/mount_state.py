"""The state file of a ``mount``: what its supervisor made, so that ``umount`` can undo it.

One file per mountpoint, ``/run/libvirt-rdm-backup/mounts/<hash>.json`` (the hash of
the mountpoint's real path), written atomically, mode 0600, each time a piece is
added or removed; beside it the mount's private 0700 run directory ``<hash>/`` with
the NBD socket and the ``nbdfuse`` mount (``fuse/disk``). Read back, nothing in it
is trusted: :func:`load` checks its shape, that every path is the one this
mountpoint implies, that every loop device is backed by the mount's ``nbdfuse`` file,
and that every process is the one that was recorded (start time and command line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from libvirt_rdm_backup import loopmount
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.fileutil import read_regular, write_atomic

MOUNTS_DIR = "/run/libvirt-rdm-backup/mounts"
VERSION = 1
MAX_STATE = 1 << 20
NAME_RE = re.compile(r"p[0-9]{1,4}|disk")


@dataclass
class Proc:
    """A process of the mount: its id and when it started (clock ticks after boot)."""

    pid: int
    start: int


@dataclass
class Piece:
    """A filesystem of the mount: its name, its loop device (over ``size`` bytes at
    ``offset`` of the nbdfuse file), where it is mounted."""

    name: str
    device: str
    path: str
    offset: int
    size: int
    mounted: bool = False


@dataclass
class MountState:
    """What a mount's supervisor made (see the module's description)."""

    mountpoint: str
    run_dir: str
    supervisor: Proc
    nbdfuse: Proc | None = None
    pieces: list[Piece] = field(default_factory=list)
    backup_id: str = ""
    disk: str = ""

    @property
    def fuse_dir(self) -> str:
        return os.path.join(self.run_dir, "fuse")

    @property
    def disk_file(self) -> str:
        return os.path.join(self.fuse_dir, "disk")

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "nbd.sock")

    def to_dict(self) -> dict[str, Any]:
        """The state file's document."""
        return {"version": VERSION, **asdict(self)}


def key(mountpoint: str) -> str:
    """The name of a mountpoint's state: a hash of its real path."""
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]


def state_path(mountpoint: str, root: str = MOUNTS_DIR) -> str:
    return os.path.join(root, f"{key(mountpoint)}.json")


def run_dir(mountpoint: str, root: str = MOUNTS_DIR) -> str:
    return os.path.join(root, key(mountpoint))


def save(state: MountState, root: str = MOUNTS_DIR) -> None:
    """Write the state file (atomically, 0600)."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    data = json.dumps(state.to_dict(), indent=1).encode()
    write_atomic(state_path(state.mountpoint, root), data, mode=0o600)


def remove(state: MountState, root: str = MOUNTS_DIR) -> None:
    """Remove the state file, when it is still this supervisor's."""
    path = state_path(state.mountpoint, root)
    with contextlib.suppress(OSError, UsageError):
        if load(state.mountpoint, root, check_processes=False).supervisor.pid \
                == state.supervisor.pid:
            os.unlink(path)


def load(mountpoint: str, root: str = MOUNTS_DIR, check_processes: bool = True
         ) -> MountState:
    """The state of the mount at ``mountpoint``, checked (UsageError: none, or one that
    must not be acted on)."""
    real = os.path.realpath(mountpoint)
    path = state_path(real, root)
    try:
        raw = read_regular(path, MAX_STATE)
    except FileNotFoundError as err:
        raise UsageError(f"{mountpoint} is not a mount of rdm-backup") from err
    except OSError as err:
        raise UsageError(f"cannot read the state of {mountpoint}: {err.strerror}") from err
    try:
        document = json.loads(raw)
        state = _parse(document)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"the state file {path} is malformed: {err}") from err
    problem = state_problem(state, real, root, check_processes)
    if problem is not None:
        raise UsageError(f"the state file {path} is refused: {problem}")
    return state


def _parse(document: Any) -> MountState:
    """A MountState from a decoded state file (KeyError, TypeError, ValueError)."""
    if not isinstance(document, dict) or document.get("version") != VERSION:
        raise ValueError("not a version 1 state document")
    known = {"version", "mountpoint", "run_dir", "supervisor", "nbdfuse", "pieces",
             "backup_id", "disk"}
    if set(document) != known:
        raise ValueError(f"unexpected keys {sorted(set(document) ^ known)}")
    pieces = document["pieces"]
    if not isinstance(pieces, list):
        raise TypeError("pieces is not a list")
    fuse = document["nbdfuse"]
    return MountState(
        mountpoint=_text(document["mountpoint"]), run_dir=_text(document["run_dir"]),
        supervisor=_proc(document["supervisor"]),
        nbdfuse=None if fuse is None else _proc(fuse),
        pieces=[_piece(p) for p in pieces], backup_id=_text(document["backup_id"]),
        disk=_text(document["disk"]))


def _text(value: Any) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise TypeError(f"not a string: {value!r}")
    return value


def _number(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TypeError(f"not a positive integer: {value!r}")
    return value


def _proc(value: Any) -> Proc:
    if not isinstance(value, dict) or set(value) != {"pid", "start"}:
        raise TypeError(f"not a process: {value!r}")
    return Proc(_number(value["pid"]), _number(value["start"]))


def _piece(value: Any) -> Piece:
    if not isinstance(value, dict) or \
            set(value) != {"name", "device", "path", "offset", "size", "mounted"}:
        raise TypeError(f"not a mounted piece: {value!r}")
    if not isinstance(value["mounted"], bool):
        raise TypeError("mounted is not true or false")
    offset = value["offset"]
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise TypeError(f"not an offset: {offset!r}")
    return Piece(_text(value["name"]), _text(value["device"]), _text(value["path"]),
                 offset, _number(value["size"]), value["mounted"])


def state_problem(state: MountState, mountpoint: str, root: str,
                  check_processes: bool = True) -> str | None:
    """What in a state read back must not be acted on, or None."""
    if state.mountpoint != mountpoint:
        return f"it is the state of {state.mountpoint!r}, not of {mountpoint!r}"
    if state.run_dir != run_dir(mountpoint, root):
        return f"run directory {state.run_dir!r} is not {run_dir(mountpoint, root)!r}"
    for piece in state.pieces:
        if not NAME_RE.fullmatch(piece.name) or \
                piece.path != os.path.join(mountpoint, piece.name):
            return f"{piece.path!r} is not a place this mount uses"
        if not loopmount.LOOP_RE.fullmatch(piece.device):
            return f"{piece.device!r} is not a loop device"
        backing = loopmount.loop_backing(piece.device)
        if backing is not None and not our_loop(state, piece):
            return f"{piece.device} is backed by {backing!r}, not by this mount's file"
    if not check_processes:
        return None
    if not _ours(state.supervisor, _is_supervisor(mountpoint)):
        return f"process {state.supervisor.pid} is not this mount's supervisor"
    if state.nbdfuse is not None and not _ours(state.nbdfuse, _is_nbdfuse(state.disk_file)):
        return f"process {state.nbdfuse.pid} is not this mount's nbdfuse"
    return None


def our_loop(state: MountState, piece: Piece) -> bool:
    """True when ``piece``'s loop device is attached over this mount's nbdfuse file.

    Once nbdfuse is gone (killed), its mount is detached and the kernel names the file
    relative to it (``/disk``): then the device must also be the one recorded, over the
    same bytes (offset and size), and mounted where the piece is or nowhere there."""
    backing = loopmount.loop_backing(piece.device)
    if backing == state.disk_file:
        return True
    return (backing == "/" + os.path.basename(state.disk_file)
            and not loopmount.is_mountpoint(state.fuse_dir)
            and loopmount.loop_range(piece.device) == (piece.offset, piece.size)
            and loopmount.mounted_device(piece.path) in (piece.device, None))


def _ours(proc: Proc, matches: Any) -> bool:
    """True when ``proc`` is gone (nothing to act on) or is the process recorded."""
    start = loopmount.process_start(proc.pid)
    if start is None or (start == proc.start and loopmount.process_state(proc.pid) == "Z"):
        return True  # gone, or dead and not yet reaped
    argv = loopmount.process_argv(proc.pid)
    return start == proc.start and argv is not None and bool(matches(argv))


def _is_supervisor(mountpoint: str) -> Any:
    def matches(argv: list[str]) -> bool:
        tool = any("rdm-backup" in os.path.basename(a) or "libvirt_rdm_backup" in a
                   for a in argv[:3])
        return tool and "mount" in argv
    return matches


def _is_nbdfuse(disk_file: str) -> Any:
    def matches(argv: list[str]) -> bool:
        return os.path.basename(argv[0]) == "nbdfuse" and disk_file in argv
    return matches


def alive(proc: Proc | None) -> bool:
    """True when the recorded process still runs."""
    return proc is not None and loopmount.process_start(proc.pid) == proc.start \
        and loopmount.process_state(proc.pid) != "Z"
