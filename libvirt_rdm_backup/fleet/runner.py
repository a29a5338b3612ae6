"""Backups of many domains side by side: one child ``rdm-backup backup UUID ... --json`` each.

Why child processes and not threads running the engine: a backup is cancelled by unwinding
it (SIGINT or SIGTERM becomes ``KeyboardInterrupt``, and every cleanup runs: the guest
resumed and thawed, QEMU jobs cancelled, block nodes and exports removed, the watchdog told).
Python delivers signals to the main thread only, so a backup in another thread could not be
cancelled that way; the engine also starts helpers of its own (a watchdog per consistency
window, qemu-storage-daemon, libvirt connections), logs through the process-wide logging
setup and keeps a libvirt error handler per process. A child per domain keeps all of that as
it is for one backup, isolates one domain's failure (even a crash) from the others, and its
exit code is that domain's code. The domain lock (``locks.py``) still keeps two backups of one
domain apart.

Children run in sessions of their own: a Ctrl-C at the terminal reaches only this process,
which then starts no more and sends each running child one SIGTERM (its own clean cancel), and
waits for them. A child dies with this process if it is killed outright (``PR_SET_PDEATHSIG``).
The libvirt URI reaches the children in ``LIBVIRT_DEFAULT_URI``, never on their command line
(it may hold a password).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.fleet.selection import Candidate
from libvirt_rdm_backup.fleet.severity import normalized
from libvirt_rdm_backup.process import die_with_parent
from libvirt_rdm_backup.redact import printable, redact

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between looks at the running children
MAX_OUTPUT = 1 << 20  # bytes of a child's output read back
MAX_ERROR = 1000  # characters of a child's error line kept
ERROR_PREFIX = "rdm-backup: error: "
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass
class DomainResult:
    """What became of one domain in a run (``skipped``: why it was not backed up)."""

    domain: str
    uuid: str
    id: str | None = None
    level: str | None = None
    bytes: int | None = None
    seconds: float | None = None
    error: str | None = None
    exit_code: int = 0
    skipped: str | None = None
    started: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The entry of this domain in the ``backup --all --json`` document."""
        return {"id": self.id, "domain": self.domain, "uuid": self.uuid, "level": self.level,
                "bytes": self.bytes, "seconds": self.seconds, "error": self.error,
                "exit_code": self.exit_code, "skipped": self.skipped}


def backup_argv(uuid: str, target: str, options: Sequence[str]) -> list[str]:
    """The command line of one domain's backup (this Python, this package)."""
    return [sys.executable, "-m", "libvirt_rdm_backup", "backup", uuid, "--target", target,
            "--json", *options]


def _one_line(text: str) -> str:
    return printable(redact(" ".join(text.split())))[:MAX_ERROR]


def _error_line(stderr: str, code: int) -> str:
    """The child's error line (``rdm-backup: error: ...``), else its last line, else the code."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return _one_line(line.removeprefix(ERROR_PREFIX))
    if lines:
        return _one_line(lines[-1].removeprefix("rdm-backup: "))
    return f"the backup ended with exit code {code}" if code >= 0 else (
        f"the backup was killed by signal {-code}")


def _read(stream: IO[bytes]) -> str:
    stream.seek(0)
    return stream.read(MAX_OUTPUT).decode("utf-8", "replace")


def _fill_from_document(result: DomainResult, stdout: str) -> None:
    """Take the backup id, level and bytes from the child's ``backup --json`` document."""
    try:
        doc = json.loads(stdout)
        backup_id, level, moved = doc["backup_id"], doc["level"], doc["bytes_transferred"]
        if not (isinstance(backup_id, str) and isinstance(level, str)
                and isinstance(moved, int)):
            raise TypeError("unexpected types")
    except (ValueError, TypeError, KeyError) as err:
        result.exit_code = OperationError.exit_code
        result.error = f"the backup did not print its JSON document: {err}"
        return
    result.id, result.level, result.bytes = _one_line(backup_id), _one_line(level), moved


@dataclass
class _Child:
    candidate: Candidate
    proc: subprocess.Popen[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]
    started: float

    def result(self, verbose: bool) -> DomainResult:
        code = self.proc.returncode
        result = DomainResult(self.candidate.name, self.candidate.uuid,
                              seconds=round(time.monotonic() - self.started, 3),
                              exit_code=normalized(code) if code != 0 else 0)
        stderr = _read(self.stderr)
        if verbose:
            for line in stderr.splitlines():
                sys.stderr.write(f"[{printable(self.candidate.name)}] {printable(line)}\n")
        if code == 0:
            _fill_from_document(result, _read(self.stdout))
        else:
            result.error = _error_line(stderr, code)
        for stream in (self.stdout, self.stderr):
            stream.close()
        return result


def _start(candidate: Candidate, argv: list[str], env: dict[str, str]) -> _Child:
    """Start a child in a session of its own, with this process's signals unblocked."""

    def prepare() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        die_with_parent()

    stdout, stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=env, start_new_session=True, preexec_fn=prepare)
    except OSError as err:
        stdout.close()
        stderr.close()
        raise OperationError(f"cannot start the backup of {candidate.name}: {err}") from err
    return _Child(candidate, proc, stdout, stderr, time.monotonic())


Done = Callable[[DomainResult], None]


class Runner:
    """Runs the backups of ``candidates``, at most ``jobs`` at once; ``done`` is called in
    this (the main) thread with each result as it is known."""

    def __init__(self, argv: Callable[[Candidate], list[str]], jobs: int, done: Done,
                 env: dict[str, str] | None = None, verbose: bool = False) -> None:
        self.argv = argv
        self.jobs = max(1, jobs)
        self.done = done
        self.env = dict(os.environ if env is None else env)
        self.verbose = verbose
        self.interrupted = False

    def run(self, candidates: Sequence[Candidate]) -> list[DomainResult]:
        """Every domain's result, in the order of ``candidates``.

        On SIGINT or SIGTERM (``KeyboardInterrupt``) no more backups start, each running one
        is cancelled and waited for; the ones never started are reported as such.
        """
        results: dict[str, DomainResult] = {}

        def finish(result: DomainResult) -> None:
            results[result.uuid] = result
            self.done(result)

        for candidate in candidates:
            if candidate.skipped is not None:
                finish(DomainResult(candidate.name, candidate.uuid, skipped=candidate.skipped))
        queue = [c for c in candidates if c.skipped is None]
        running: list[_Child] = []
        try:
            self._loop(queue, running, finish)
        except KeyboardInterrupt:
            self.interrupted = True
            self._cancel(running, finish)
        for candidate in queue:
            if candidate.uuid not in results:
                results[candidate.uuid] = DomainResult(
                    candidate.name, candidate.uuid, exit_code=OperationError.exit_code,
                    error="not started: the run was interrupted", started=False)
        return [results[c.uuid] for c in candidates]

    def _loop(self, queue: list[Candidate], running: list[_Child], finish: Done) -> None:
        waiting = list(queue)

        def step() -> bool:
            """Start what may start, report what ended; True once everything has ended."""
            while waiting and len(running) < self.jobs:
                candidate = waiting.pop(0)
                signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
                try:  # a signal now waits until the child is in ``running``
                    running.append(_start(candidate, self.argv(candidate), self.env))
                except OperationError as err:
                    finish(DomainResult(candidate.name, candidate.uuid, error=str(err),
                                        exit_code=err.exit_code))
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            _reap(running, finish, self.verbose)
            return not waiting and not running

        retry.poll(None, POLL)(step)

    def _cancel(self, running: list[_Child], finish: Done) -> None:
        """Send each running backup one SIGTERM and wait for all of them to end."""
        for child in running:
            log.warning("cancelling the backup of %s", child.candidate.name)
            try:
                child.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        while running:
            try:
                retry.poll(None, POLL)(lambda: not _reap(running, finish, self.verbose))
            except KeyboardInterrupt:  # another signal: the cancels are under way already
                continue


def _reap(running: list[_Child], finish: Done, verbose: bool) -> list[_Child]:
    """Report the children that ended and take them out of ``running``; those left."""
    for child in [c for c in running if c.proc.poll() is not None]:
        running.remove(child)
        finish(child.result(verbose))
    return running
