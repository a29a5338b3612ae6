"""Every retry and wait-until of the package, as named tenacity policies in one place.

A policy is a function returning a configured :class:`tenacity.Retrying`; call it
with the attempt (``policy(...)(attempt)``). An attempt either returns a value
(policies that wait for a state retry while it is falsy) or raises what the policy
retries on. Running out of time or attempts raises the project's own error with
a one-line message (never tenacity's ``RetryError``); any other error of an
attempt is raised as it is, at once. Each wait is logged at debug level.

What is not here, on purpose: the stall watchdogs of data movers (a tool or job
given up after no I/O for the stall limit) are progress checks inside an
attempt, and a deliberate pause (letting a write settle) is not a retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    TryAgain,
    before_sleep_log,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    stop_never,
    wait_chain,
    wait_exponential,
    wait_fixed,
    wait_none,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from libvirt_rdm_backup.errors import CommandError, OperationError, RdmBackupError, StorageError

log = logging.getLogger(__name__)

ErrorFactory = Callable[[str], RdmBackupError]

LUKS_RETRY_FIRST = 0.1  # s: the first pause after a failed LUKS key-derivation benchmark
LUKS_RETRY_MAX = 2.0  # s: the longest pause between such attempts
EXPORT_POLL = 0.05  # seconds between looks at QEMU's list of NBD exports
JOB_POLL_FIRST = 0.005  # first pause while waiting for QEMU jobs; doubles up to ``poll``
JOB_CANCEL_POLL = 0.1
SOCKET_POLL = 0.02
FLOCK_POLL = 0.01
WINDOW_QUICK = 10  # attempts 0.2 s apart to undo a window: a dead tool's lock is freed at once
WINDOW_QUICK_EVERY = 0.2
WINDOW_SLOW_EVERY = 3.0
SERVE_POLL = 0.1


def _not(value: object) -> bool:
    return not value


def _last_error(state: RetryCallState) -> BaseException | None:
    outcome = state.outcome
    return outcome.exception() if outcome is not None and outcome.failed else None


def _raise(error: ErrorFactory, message: str) -> Callable[[RetryCallState], Any]:
    """``retry_error_callback`` raising ``error(message)``, chained to the last failure."""

    def give_up(state: RetryCallState) -> Any:
        raise error(message) from _last_error(state)

    return give_up


def _timeout(seconds: float | None) -> stop_base:
    return stop_never if seconds is None else stop_after_delay(seconds)


def _policy(
    *,
    stop: stop_base,
    wait: wait_base | Callable[[RetryCallState], float],
    retry: retry_base,
    on_give_up: Callable[[RetryCallState], Any],
) -> Retrying:
    return Retrying(
        stop=stop,
        wait=wait,
        retry=retry,
        reraise=True,
        before_sleep=before_sleep_log(log, logging.DEBUG),
        retry_error_callback=on_give_up,
    )


class Again(TryAgain):
    """Raised by an attempt to ask for another one, ``delay`` seconds later."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay


# -- generic waits ---------------------------------------------------------------------------


def until(timeout: float | None, interval: float, message: str,
          error: ErrorFactory = OperationError) -> Retrying:
    """Call the attempt every ``interval`` s until it returns something true (returned);
    ``error(message)`` once ``timeout`` s passed (None: no limit)."""
    return _policy(stop=_timeout(timeout), wait=wait_fixed(interval),
                   retry=retry_if_result(_not), on_give_up=_raise(error, message))


def poll(timeout: float | None, interval: float) -> Retrying:
    """Call the attempt every ``interval`` s until it returns True (then True), or return
    False once ``timeout`` s passed (None: no limit)."""
    return _policy(stop=_timeout(timeout), wait=wait_fixed(interval),
                   retry=retry_if_result(_not), on_give_up=lambda _state: False)


def serve_until_stopped(timeout: float | None) -> Retrying:
    """A command that serves until its attempt says stop (a signal came) or ``timeout``;
    the result says which: True stopped, False timed out."""
    return poll(timeout, SERVE_POLL)


# -- QEMU --------------------------------------------------------------------------------------


def wait_export_removed(export_id: str, timeout: float) -> Retrying:
    """Until the attempt returns True (NBD export ``export_id`` is no longer listed)."""
    return until(timeout, EXPORT_POLL,
                 f"NBD export {export_id} did not go away within {timeout:g} s")


def job_wait(poll_max: float) -> Retrying:
    """Until the attempt returns True (every job concluded): polled quickly at first, the
    pause doubling up to ``poll_max`` s (short jobs end fast, long ones cost few polls).

    No time limit here: the attempt gives up itself when the jobs stall.
    """
    return _policy(stop=stop_never,
                   wait=wait_exponential(multiplier=JOB_POLL_FIRST, max=poll_max),
                   retry=retry_if_result(_not), on_give_up=lambda _state: False)


def job_cancel(job_ids: list[str], timeout: float) -> Retrying:
    """Until the attempt returns True (the cancelled jobs are gone); only logged (False)
    when they do not stop within ``timeout``: a cleanup path, the next run removes them."""

    def note(_state: RetryCallState) -> bool:
        log.info("jobs %s did not stop within %g s (the next run removes them)",
                 ", ".join(job_ids), timeout)
        return False

    return _policy(stop=stop_after_delay(timeout), wait=wait_fixed(JOB_CANCEL_POLL),
                   retry=retry_if_result(_not), on_give_up=note)


def job_stop(job_id: str, timeout: float) -> Retrying:
    """Until the attempt returns True (a cancelled job is gone); OperationError after
    ``timeout`` s."""
    return until(timeout, EXPORT_POLL, f"QEMU job {job_id} did not stop within {timeout:g} s")


def socket_wait(argv: list[str], sock: str, timeout: float) -> Retrying:
    """Until the attempt returns True (a server started by ``argv`` accepts on unix socket
    ``sock``); CommandError naming the tool after ``timeout`` s."""

    def fail(message: str) -> RdmBackupError:
        return CommandError(argv, -1, message)

    return until(timeout, SOCKET_POLL, f"no socket {sock} after {timeout:g} s", fail)


# -- host --------------------------------------------------------------------------------------


def flock_wait(path: str, timeout: float) -> Retrying:
    """While the attempt raises BlockingIOError (``flock`` of ``path`` is held by another
    process) or returns None (the file was replaced meanwhile: open it again).

    OperationError when it stays held for ``timeout`` s.
    """
    return _policy(
        stop=stop_after_delay(timeout), wait=wait_fixed(FLOCK_POLL),
        retry=retry_if_exception_type(BlockingIOError) | retry_if_result(lambda fd: fd is None),
        on_give_up=_raise(OperationError, f"{path} stays locked by another process"))


def tgt_tid_allocation(iqn: str, attempts: int) -> Retrying:
    """While the attempt raises :class:`Again` (the tid it chose was taken meanwhile by
    someone else: choose again), at most ``attempts`` times, without pause; then
    StorageError with the last refusal (the cause of the last :class:`Again`)."""
    return _again(attempts, lambda cause: StorageError(
        f"cannot create tgt target {iqn}: {cause}"))


def luks_create(path: str, attempts: int) -> Retrying:
    """While creating an encrypted image raises :class:`Again` (QEMU's key-derivation
    benchmark measured no CPU time: "Unable to get accurate CPU usage", a coarse clock
    under load), at most ``attempts`` times, after pauses growing from 0.1 s to 2 s (a
    failed benchmark costs milliseconds; the pause lets a burst of load pass); then
    OperationError."""
    return _again(attempts, lambda cause: OperationError(
        f"cannot create encrypted image {path}: {cause}"),
        wait=wait_exponential(multiplier=LUKS_RETRY_FIRST, max=LUKS_RETRY_MAX))


def _again(attempts: int, error: Callable[[BaseException | None], Exception],
           wait: wait_base | None = None) -> Retrying:
    """While the attempt raises :class:`Again`, at most ``attempts`` times, without pause
    unless ``wait`` says; then ``error`` of the last refusal (the cause of the last
    :class:`Again`)."""

    def give_up(state: RetryCallState) -> Any:
        last = _last_error(state)
        cause = last.__cause__ if isinstance(last, Again) and last.__cause__ else last
        raise error(cause) from cause

    return _policy(stop=stop_after_attempt(attempts), wait=wait or wait_none(),
                   retry=retry_if_exception_type(Again), on_give_up=give_up)


# -- the writer lease of an NBD volume ---------------------------------------------------------


def _asked_delay(state: RetryCallState) -> float:
    last = _last_error(state)
    return last.delay if isinstance(last, Again) else 0.0


def lease_claim(uri: str, attempts: int) -> Retrying:
    """While the attempt raises :class:`Again` (a lease to watch for a renewal, or a claim
    too slow to write), at most ``attempts`` times; OperationError when they run out."""
    return _policy(
        stop=stop_after_attempt(attempts), wait=_asked_delay,
        retry=retry_if_exception_type(Again),
        on_give_up=_raise(OperationError, f"NBD volume {uri}: cannot take the writer lease: "
                          "its table of contents keeps changing, or the server answers "
                          "too slowly"))


# -- the consistency-window watchdog -----------------------------------------------------------


def window_repair(linger: float) -> Retrying:
    """Until the attempt returns True (the window a dead tool left is undone): first
    ``WINDOW_QUICK`` attempts quickly, then every ``WINDOW_SLOW_EVERY`` s; False once
    ``linger`` s passed."""
    quick = [wait_fixed(WINDOW_QUICK_EVERY)] * (WINDOW_QUICK - 1)
    return _policy(stop=stop_after_delay(linger),
                   wait=wait_chain(*quick, wait_fixed(WINDOW_SLOW_EVERY)),
                   retry=retry_if_result(_not), on_give_up=lambda _state: False)
