"""Copies made while the guest is paused, and the bound on them (``--max-pause``).

A SCSI passthrough LUN that no storage agent can snapshot has neither dirty
tracking nor a storage snapshot: its point in time is held by pausing the
guest for the whole copy (about a second per GiB here; hours for a multi-TiB
LUN). Before pausing, the LUN's read rate is measured on a short sample and a
copy that could not finish within the bound is refused; inside the window the
copy is given up (and the guest resumed) when the bound is reached.
"""

from __future__ import annotations

import re
import time

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, UsageError
from libvirt_rdm_backup.process import require_tool, run
from libvirt_rdm_backup.storage.snapshot_agents import find_snapshot_agent

DEFAULT_MAX_PAUSE = 30.0  # seconds
MiB = 1 << 20
SAMPLE = 32 * MiB  # bytes read to measure a LUN's read rate
SAMPLE_TIMEOUT = 60.0
_COMPLETED_RE = re.compile(r"Run completed in ([0-9.]+) seconds")
REASON = ("SCSI passthrough LUN without a snapshot-capable storage agent (a LUN of the local "
          "tgtd, or a loop device, over a file on a reflink filesystem): no dirty tracking "
          "and no storage snapshot, so it is copied in full while the guest is paused")


class PauseBoundError(OperationError):
    """A copy with the guest paused would take, or took, longer than ``--max-pause``."""


def check_max_pause(seconds: float) -> float:
    """``seconds`` when it is a usable bound (raises UsageError)."""
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise UsageError(f"--max-pause must be a positive number of seconds, not {seconds!r}")
    return seconds


def paused_copy_reason(disk: RawDisk) -> str | None:
    """Why a backup of the running domain would copy ``disk`` with the guest paused (None:
    it would not)."""
    if not disk.is_passthrough_lun or find_snapshot_agent(disk) is not None:
        return None
    return REASON


def needs_paused_copy(plan: DiskPlan, running: bool) -> bool:
    """True for a plan copied from storage while the guest is paused."""
    return running and plan.path is DataPath.STORAGE and plan.disk.is_passthrough_lun


def read_rate(source: str, size: int) -> float:
    """Bytes per second read from the raw ``source`` (path or ``iscsi://`` URL): a sample
    of its first bytes read with ``qemu-img bench`` as the copy reads (8 requests at once).

    ``qemu-img bench`` stays: a bounded read sample, timed, before any job exists.
    """
    block = min(MiB, size)
    count = max(1, min(size, SAMPLE) // block)
    argv = [require_tool("qemu-img"), "bench", "-U", "-f", "raw", "-d", "8",
            "-c", str(count), "-s", str(block), source]
    started = time.monotonic()
    output = run(argv, timeout=SAMPLE_TIMEOUT).stdout
    match = _COMPLETED_RE.search(output)
    seconds = float(match.group(1)) if match else time.monotonic() - started
    return count * block / max(seconds, 1e-3)


def refuse_long_pauses(plans: list[DiskPlan], running: bool, max_pause: float,
                       speed: int = 0) -> None:
    """Refuse, before anything is paused, a paused copy that could not finish in time
    (at the measured read rate, or at ``speed`` bytes/s when that limit is lower)."""
    for plan in plans:
        if not needs_paused_copy(plan, running):
            continue
        size = plan.disk.size or 0
        rate = read_rate(plan.disk.source, size)
        if speed:
            rate = min(rate, float(speed))
        estimate = size / rate
        limit = "--bwlimit" if speed and rate >= speed else "measured read rate"
        if estimate > max_pause:
            raise PauseBoundError(
                f"disk {plan.disk.target}: copying it with the guest paused would take about "
                f"{estimate:.1f} s ({size / MiB:.0f} MiB at {rate / MiB:.0f} MiB/s, the "
                f"{limit}), more than --max-pause {max_pause:g} s; nothing was paused (raise "
                "--max-pause, put the LUN on snapshot-capable storage, or leave it out "
                "with --disk)")


def over_bound(plan: DiskPlan, max_pause: float, err: RdmBackupError) -> PauseBoundError:
    """The error of a paused copy given up at the bound."""
    return PauseBoundError(
        f"disk {plan.disk.target}: the copy with the guest paused did not finish within "
        f"--max-pause {max_pause:g} s; it was cancelled, the guest resumed and nothing "
        f"published ({err.message})")
