"""QMP transactions and block-job waiting."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError, RdmBackupError
from libvirt_rdm_backup.process import stall_timeout
from libvirt_rdm_backup.qemu.monitor import Monitor, qmp_timeout

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class JobResult:
    """The end state of a finished job."""

    job_id: str
    status: str
    current: int
    total: int
    error: str | None


COPY_CHUNK = 64 << 10  # one qcow2 cluster: every all-zero cluster stays unstored


def backup_action(
    job_id: str, device: str, target: str, sync: str = "full", bitmap: str | None = None,
    speed: int = 0, chunk: int = COPY_CHUNK, compress: bool = False,
) -> dict[str, Any]:
    """A ``blockdev-backup`` transaction action that stays visible until dismissed.

    With a bitmap (``sync=bitmap``) the bitmap is left as it is (``never``): it
    is dropped only after the new backup was published. ``speed``: bytes per second
    the job may copy (0: no limit). ``chunk``: the largest request the job writes; a
    request that is all zeros is not stored, so smaller chunks keep more zeros out.
    ``compress``: the job writes compressed clusters (a qcow2 target).
    """
    data: dict[str, Any] = {
        "job-id": job_id,
        "device": device,
        "target": target,
        "sync": sync,
        "auto-finalize": True,
        "auto-dismiss": False,
        "x-perf": {"max-workers": 64, "max-chunk": chunk},
    }
    if speed:
        data["speed"] = speed
    if compress:
        data["compress"] = True
    if bitmap is not None:
        data["bitmap"] = bitmap
        data["bitmap-mode"] = "never"
    return {"type": "blockdev-backup", "data": data}


def transaction(monitor: Monitor, actions: Iterable[dict[str, Any]]) -> None:
    """Run actions atomically: all start at one point in time, or none does."""
    monitor.execute("transaction", {"actions": list(actions)})


def _job_states(monitor: Monitor) -> dict[str, dict[str, Any]]:
    return {str(j["id"]): j for j in monitor.execute("query-jobs") or []}


def wait_jobs(
    monitor: Monitor,
    job_ids: Iterable[str],
    progress: ProgressCallback | None = None,
    poll: float = 0.1,
    stall: float | None = None,
    check: Callable[[], None] | None = None,
) -> list[JobResult]:
    """Wait until every job concluded, dismiss them, and return their results.

    Raises OperationError naming the first failed job (after dismissing all), or
    when no job made progress for ``stall`` seconds (default: the stall limit of
    the data movers); the caller cancels what is left. ``check`` runs at every poll
    and may raise to give up.
    """
    pending = set(job_ids)
    results: dict[str, JobResult] = {}
    stall = stall_timeout() if stall is None else stall
    moved, last_move = -1, time.monotonic()

    def attempt() -> bool:
        """One look at the jobs; True once none is pending."""
        nonlocal moved, last_move
        if check is not None:
            check()
        states = _job_states(monitor)
        done = sum(int(states.get(j, {}).get("current-progress", 0)) for j in pending)
        if done != moved:
            moved, last_move = done, time.monotonic()
        elif time.monotonic() - last_move > stall:
            raise OperationError(f"QEMU job {min(pending)} made no progress for {stall:g} s "
                                 "(is the storage answering?)")
        for job_id in sorted(pending):
            state = states.get(job_id)
            if state is None:
                results[job_id] = JobResult(job_id, "vanished", 0, 0, "job disappeared")
                pending.discard(job_id)
                continue
            current = int(state.get("current-progress", 0))
            total = int(state.get("total-progress", 0))
            if progress is not None:
                progress(job_id, current, total)
            if state["status"] in ("concluded", "null"):
                results[job_id] = JobResult(
                    job_id, str(state["status"]), current, total, state.get("error")
                )
                pending.discard(job_id)
                with suppress(RdmBackupError):
                    monitor.execute("job-dismiss", {"id": job_id})
        return not pending

    if pending:
        retry.job_wait(poll)(attempt)
    failed = [r for r in results.values() if r.error]
    if failed:
        raise OperationError(f"QEMU job {failed[0].job_id} failed: {failed[0].error}")
    return list(results.values())


def cancel_jobs(monitor: Monitor, job_ids: Iterable[str]) -> None:
    """Cancel and dismiss jobs, ignoring the ones already gone (cleanup path).

    Waits for them to stop at most :func:`~.monitor.qmp_timeout` seconds.
    """
    ids = list(job_ids)
    for job_id in ids:
        with suppress(RdmBackupError):
            monitor.execute("job-cancel", {"id": job_id})

    def stopped() -> bool:
        try:
            states = _job_states(monitor)
        except RdmBackupError:
            return True  # QEMU is gone, and its jobs with it
        remaining = [j for j in ids if j in states]
        for job_id in remaining:
            if states[job_id]["status"] in ("concluded", "null"):
                with suppress(RdmBackupError):
                    monitor.execute("job-dismiss", {"id": job_id})
        return not [j for j in remaining if states[j]["status"] not in ("concluded", "null")]

    retry.job_cancel(ids, qmp_timeout())(stopped)
