"""The kernel side of ``mount``: an NBD export as a file (``nbdfuse``), read-only loop devices
over parts of it, read-only mounts of those; and what ``/proc`` and sysfs say about them.

No kernel NBD client is needed: ``nbdfuse -r`` presents the export as one file of a
FUSE mount, and ``losetup -r --offset --sizelimit`` gives each partition its own
read-only block device.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import CommandError, OperationError
from libvirt_rdm_backup.process import die_with_parent, require_tool, run

TIMEOUT = 120.0
READY_TIMEOUT = 60.0  # seconds nbdfuse gets to present the file
GONE_POLL = 0.05  # seconds between looks at a process that should exit
LOOP_RE = re.compile(r"/dev/loop([0-9]{1,6})")


def attach_loop(path: str, offset: int, size: int) -> str:
    """A new read-only loop device over ``size`` bytes at ``offset`` of ``path``."""
    done = run([require_tool("losetup"), "-r", "--offset", str(offset), "--sizelimit",
                str(size), "--show", "-f", path], timeout=TIMEOUT)
    device = done.stdout.strip()
    if not LOOP_RE.fullmatch(device):
        raise OperationError(f"losetup named no loop device: {device!r}")
    return device


def detach_loop(device: str) -> None:
    """Detach the loop device ``device``."""
    run([require_tool("losetup"), "-d", device], timeout=TIMEOUT)


def loop_backing(device: str) -> str | None:
    """The file behind the loop device ``device`` (None: not attached, or not a loop)."""
    found = LOOP_RE.fullmatch(device)
    if found is None:
        return None
    try:
        with open(f"/sys/block/loop{found.group(1)}/loop/backing_file",
                  encoding="utf-8") as stream:
            return stream.read().rstrip("\n")
    except OSError:
        return None


def loop_range(device: str) -> tuple[int, int] | None:
    """The offset and size limit of the loop device ``device`` (None: not a loop device,
    or not attached)."""
    found = LOOP_RE.fullmatch(device)
    if found is None:
        return None
    values = []
    for name in ("offset", "sizelimit"):
        try:
            with open(f"/sys/block/loop{found.group(1)}/loop/{name}", encoding="ascii") as f:
                values.append(int(f.read().strip()))
        except (OSError, ValueError):
            return None
    return values[0], values[1]


def mounted_device(path: str) -> str | None:
    """The device mounted at ``path`` (``/proc/self/mounts``; None: nothing)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and _unescape(fields[1]) == path:
            found = fields[0]  # the last one is what the path shows
    return found


def _unescape(field: str) -> str:
    """A path of /proc/mounts (spaces, tabs, newlines, backslashes written as octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_read_only(device: str, fstype: str, options: str, path: str) -> None:
    """Mount the filesystem on ``device`` at ``path`` (``options`` start with ``ro``)."""
    if not options.startswith("ro"):
        raise OperationError(f"refusing to mount {device} with options {options!r}")
    run([require_tool("mount"), "-t", fstype, "-o", options, device, path], timeout=TIMEOUT)


def unmount(path: str, lazy: bool = False) -> None:
    """Unmount ``path`` (``lazy``: detach it now even when busy). CommandError when it
    cannot be (``target is busy``)."""
    run([require_tool("umount"), *(["-l"] if lazy else []), path], timeout=TIMEOUT)


def is_mountpoint(path: str) -> bool:
    """True when something is mounted at ``path``."""
    return os.path.ismount(path)


def start_nbdfuse(file: str, uri: str, pidfile: str) -> subprocess.Popen[bytes]:
    """``nbdfuse -r`` presenting the export at ``uri`` as ``file`` (its directory must be
    empty), returned once the file is there; it dies with the caller. OperationError
    when it exits or does not get ready within :data:`READY_TIMEOUT` seconds."""
    argv = [require_tool("nbdfuse"), "-r", "-P", pidfile, file, uri]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=die_with_parent)

    def ready() -> bool:
        if proc.poll() is not None:
            why = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
            raise CommandError(argv, proc.returncode, why)
        return os.path.exists(pidfile) and os.path.getsize(pidfile) > 0

    try:
        retry.until(READY_TIMEOUT, retry.SOCKET_POLL,
                    f"nbdfuse did not present {file} within {READY_TIMEOUT:g} s")(ready)
    except BaseException:
        stop_process(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        raise
    if proc.stderr is not None:
        proc.stderr.close()
    return proc


def stop_process(pid: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``pid`` (nothing when it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until process ``pid`` (started at ``start`` clock
    ticks after boot) is gone; True when it is."""
    def gone() -> bool:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our child: reaped, else it lingers as a zombie
        return process_start(pid) != start or process_state(pid) == "Z"

    return bool(retry.poll(timeout, GONE_POLL)(gone))


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot; None: no such process)."""
    stat = _stat_fields(pid)
    try:
        return int(stat[19]) if stat else None
    except (IndexError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` (``Z``: a zombie; None: none)."""
    stat = _stat_fields(pid)
    return stat[0] if stat else None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stream:
            text = stream.read()
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise
    return text.rpartition(")")[2].split()


def process_argv(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (None: no such process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            raw = stream.read()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
