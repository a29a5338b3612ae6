"""Watchdog of a consistency window: thaws and resumes a guest that a dead tool left held.

A tool killed outright (SIGKILL, the OOM killer) inside a window cannot undo it
itself. Before the window it starts this watchdog: a process in a session of
its own (a kill of the tool's process group does not reach it, and it does not
die with the tool), whose standard input is the read end of a pipe whose write
end only the tool holds. When that pipe reads end-of-file (the tool closed it
after the window, or the kernel did when the tool died) the watchdog looks at
the window's record: gone means the window closed normally, and it exits
quietly. A record still there names what the window held; the watchdog takes
the domain's lock (free once the tool is dead) and resumes and thaws the guest
through its own libvirt connection. A guest the admin had paused before the
backup is never resumed: the record names only what the tool itself did.

When an undo fails (a guest agent that stopped answering) the record stays and
the watchdog retries, without output, until it succeeds or ``LINGER`` seconds
have passed; the next backup of the domain retries too.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass

import libvirt

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.locks import domain_lock
from libvirt_rdm_backup.process import env_seconds
from libvirt_rdm_backup.window_record import recover_window, window_open

log = logging.getLogger(__name__)

READY = b"ready\n"
START_TIMEOUT = 20.0  # seconds to wait for the watchdog's libvirt connection
LINGER_ENV = "RDM_BACKUP_WATCHDOG_LINGER"
DEFAULT_LINGER = 600.0  # seconds a watchdog keeps retrying an undo that failed


def linger() -> float:
    """Seconds a watchdog keeps retrying an undo that failed (``RDM_BACKUP_WATCHDOG_LINGER``)."""
    return env_seconds(LINGER_ENV, DEFAULT_LINGER)


@dataclass
class Watchdog:
    """The tool's end of a running watchdog."""

    proc: subprocess.Popen[bytes]
    ready: bool = False

    def wait_ready(self) -> bool:
        """Wait until the watchdog holds its libvirt connection; False (and a warning, the
        watchdog stopped) when it does not come up."""
        if self.ready:
            return True
        assert self.proc.stdout is not None
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
            answer = os.read(self.proc.stdout.fileno(), len(READY)) if ready else b""
        except OSError:
            answer = b""
        self.proc.stdout.close()
        self.ready = answer == READY
        if not self.ready:
            log.warning("no watchdog for the consistency window: it did not start")
            self.proc.kill()
            self.proc.wait()
        return self.ready

    def stop(self) -> None:
        """The window is closed (its record dropped, or kept for a failed undo): let go."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # it retries a failed undo on its own; it is not our child to wait for


def start(uri: str, domain_uuid: str, marker_dir: str, lock_dir: str) -> Watchdog | None:
    """Start a watchdog for the domain's next window (it comes up in the background: see
    :meth:`Watchdog.wait_ready`); None (and a warning) when it cannot be started."""
    try:
        proc = subprocess.Popen(
            # -P and cwd /: the module comes from the installed package, never from a
            # directory another user can write to (the tool may be run from /tmp)
            [sys.executable, "-P", "-m", "libvirt_rdm_backup.watchdog"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            start_new_session=True, close_fds=True, cwd="/")
    except OSError as err:
        log.warning("no watchdog for the consistency window: %s", err)
        return None
    assert proc.stdin is not None
    config = {"uri": uri, "uuid": domain_uuid, "marker_dir": marker_dir, "lock_dir": lock_dir}
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
    except OSError:
        pass  # wait_ready says so
    return Watchdog(proc)


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"rdm-backup watchdog: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


def _detach_output() -> None:
    """Stop holding the tool's stderr (a caller reading it to its end would wait for us)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


def _repair_once(conn: libvirt.virConnect, config: dict[str, str]) -> bool:
    """One attempt under the domain's lock; True once the window's record is gone."""
    marker_dir, uuid = config["marker_dir"], config["uuid"]
    if not os.path.exists(os.path.join(marker_dir, f"{uuid}.json")):
        return True
    try:
        with domain_lock(uuid, config["lock_dir"]):
            recover_window(conn.lookupByUUIDString(uuid), marker_dir)
            return not window_open(uuid, marker_dir)
    except (RdmBackupError, libvirt.libvirtError):
        return False  # a run holds the lock (and repairs itself), or libvirt hiccups


def _wait_for_eof() -> None:
    while True:
        try:
            if not os.read(0, 4096):
                return
        except InterruptedError:
            continue


def main() -> int:
    """Watchdog process: wait for the tool to let go, then repair what it left held."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="rdm-backup watchdog: %(message)s")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised instead
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 4096)
        if not chunk:
            return 0
        line += chunk
    try:
        config = json.loads(line)
        conn = libvirt.open(str(config["uri"]))
    except (ValueError, TypeError, KeyError) as err:
        _say(f"malformed configuration from the tool: {err}")
        return 1
    except libvirt.libvirtError as err:
        _say(f"cannot connect to libvirt: {err.get_error_message()}")
        return 1
    try:
        os.write(1, READY)
    except OSError:
        pass  # the tool stopped waiting (it gave up, or ended before any window): watch anyway
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    _wait_for_eof()
    repair = _Repair(conn, config)
    if retry.window_repair(linger())(repair):
        return 0
    _say("gave up: the guest may still be held; the next backup of the domain repairs it")
    return 1


class _Repair:
    """Attempts at undoing the window, for :func:`~.retry.window_repair`.

    After the quick attempts the tool's stderr is let go (nothing more is said, but
    a final giving up), and the libvirt connection is opened again when it broke (a
    restarted libvirtd).
    """

    def __init__(self, conn: libvirt.virConnect, config: dict[str, str]) -> None:
        self.conn = conn
        self.config = config
        self.attempts = 0

    def __call__(self) -> bool:
        self.attempts += 1
        if self.attempts > retry.WINDOW_QUICK:
            self._reconnect()
        closed = _repair_once(self.conn, self.config)  # recover_window says what it did
        if not closed and self.attempts == retry.WINDOW_QUICK:
            _detach_output()
        return closed

    def _reconnect(self) -> None:
        try:
            self.conn.getLibVersion()
        except libvirt.libvirtError:
            try:
                self.conn = libvirt.open(self.config["uri"])
            except libvirt.libvirtError:
                pass


if __name__ == "__main__":
    sys.exit(main())
