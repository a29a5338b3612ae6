"""Running external tools: argv lists only, never a shell; failures become CommandError."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

from libvirt_rdm_backup.errors import CommandError, OperationError

log = logging.getLogger(__name__)

STALL_TIMEOUT_ENV = "RDM_BACKUP_STALL_TIMEOUT"
DEFAULT_STALL_TIMEOUT = 120.0  # seconds without any I/O before a data mover counts as hung
_PR_SET_PDEATHSIG = 1
_POLL = 1.0


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name``, else ``default``."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def stall_timeout() -> float:
    """Seconds a data mover may go without any I/O (``RDM_BACKUP_STALL_TIMEOUT``)."""
    return env_seconds(STALL_TIMEOUT_ENV, DEFAULT_STALL_TIMEOUT)


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the tool dies (even by SIGKILL)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def killed_with_parent() -> None:
    """In a child before exec: get SIGKILL when the tool dies (a copy whose target is given
    up must stop writing at once, not end cleanly)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def io_counter(pid: int) -> int | None:
    """Bytes the process read and wrote so far, from /proc (None when unreadable)."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as stream:
            fields = dict(line.split(":", 1) for line in stream if ":" in line)
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def require_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH (raises OperationError when missing)."""
    path = shutil.which(name)
    if path is None:
        raise OperationError(f"required tool {name!r} is not installed")
    return path


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    input_text: str | None = None,
    stall: float | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and capture its text output.

    ``stall``: for data movers; the tool dies with us, and is killed when it does
    no I/O at all for that many seconds (its storage stopped answering). Raises
    CommandError when the tool exits non-zero (and ``check`` is set), times out or
    stalls; OperationError when it cannot be started at all. ``pass_fds``: open file
    descriptors the tool inherits (named to it as ``/dev/fd/N``).
    """
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # long-running data movers die with the tool; short commands skip the cost
            preexec_fn=die_with_parent if stall is not None else None,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as err:
        raise OperationError(f"required tool {argv[0]!r} is not installed") from err
    stdout, stderr = _wait(proc, argv, input_text, timeout, stall)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stderr or stdout)
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def _wait(proc: subprocess.Popen[str], argv: Sequence[str], input_text: str | None,
          timeout: float | None, stall: float | None) -> tuple[str, str]:
    """Collect the output of ``proc``; kill it on timeout or when it stalls."""
    start = last_change = time.monotonic()
    last_io = io_counter(proc.pid)
    while True:
        now = time.monotonic()
        step = None if timeout is None and stall is None else _POLL
        if timeout is not None:
            step = min(_POLL, max(0.0, start + timeout - now))
        try:
            return proc.communicate(input_text, timeout=step)
        except subprocess.TimeoutExpired:
            input_text = None  # already handed over
        except BaseException:
            _give_up(proc)
            raise
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            why = f"timed out after {timeout} s"
        elif stall is not None:
            counter = io_counter(proc.pid)
            if counter != last_io or counter is None:
                last_io, last_change = counter, now
                continue
            if now - last_change < stall:
                continue
            why = f"made no progress for {stall:g} s (is the storage answering?)"
        else:
            continue
        _give_up(proc)
        raise CommandError(argv, -1, why)


def _give_up(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` and wait a little, never forever: a process stuck in the kernel on
    dead storage may not die at once, and a grandchild may hold its pipes."""
    proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
