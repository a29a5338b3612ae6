"""Section ``guestio``: guest write latency while a backup pushes to a slow target.

The target is a ``qemu-nbd`` export of a sparse raw file, its writes throttled to
``TARGET_BPS`` (a QEMU throttle group inside qemu-nbd). Three runs of ``WRITES``
simulated guest writes of 1 MiB each (HMP ``qemu-io``, judged by the domain's QEMU log),
at the end of vdb, where a job copying from the start has not been yet:

- ``no_backup``: nothing else runs;
- ``direct``: a plain ``blockdev-backup`` job from the disk's node to the target (how
  backups ran before): each write first waits for its old data to reach the target;
- ``fleecing``: the tool's data path (:mod:`libvirt_rdm_backup.qemu.guard`): the job
  reads a snapshot-access node, the old data goes to a local fleecing image.

Reported: the median and worst write latency of each run, the ratio of each median to
the no-backup median, and how many writes failed. Nothing is asserted.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import libvirt

from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.qemu.blockdev import find_device
from libvirt_rdm_backup.qemu.guard import guarded_source
from libvirt_rdm_backup.qemu.jobs import backup_action, cancel_jobs, transaction
from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor
from tools.labkit import alias_of, free_port, try_guest_write, wait_for_port

MiB = 1024 * 1024
TARGET_BPS = 4 * MiB  # bytes/s the target accepts
WRITES = 8  # guest writes per run
RUNS = ("no_backup", "direct", "fleecing")
TARGET_NODE = "rdmb-bench-target"
JOB = "rdmb-bench-job"


@contextmanager
def throttled_target(work: Path, size: int) -> Iterator[int]:
    """A qemu-nbd export (raw, writes throttled) on 127.0.0.1; yields its port."""
    image = work / "rdmb-guestio-target.raw"
    with open(image, "wb") as stream:
        stream.truncate(size)
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "--persistent", "-b", "127.0.0.1", "-p", str(port), "-x", "target",
         "--object", f"throttle-group,id=rdmb-tg,x-bps-write={TARGET_BPS}", "--image-opts",
         f"driver=throttle,throttle-group=rdmb-tg,file.driver=raw,"
         f"file.file.driver=file,file.file.filename={image}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        image.unlink()


def write_latencies(dom: libvirt.virDomain, disk: str, size: int, pattern: int
                    ) -> tuple[list[float], int]:
    """WRITES guest writes of 1 MiB downwards from the end of the disk: seconds each, failures."""
    seconds, failed = [], 0
    for index in range(WRITES):
        started = time.monotonic()
        error = try_guest_write(dom, disk, pattern, size - (index + 1) * MiB, MiB)
        seconds.append(time.monotonic() - started)
        failed += error is not None
    return seconds, failed


def during_backup(dom: libvirt.virDomain, disk: str, size: int, port: int, fleecing: bool,
                  pattern: int) -> tuple[list[float], int]:
    """Guest write latencies while a full backup of ``disk`` pushes to the target."""
    monitor = LibvirtMonitor(dom)
    node = find_device(monitor, alias_of(dom, disk)[0]).node_name
    monitor.execute("blockdev-add", {
        "driver": "raw", "node-name": TARGET_NODE,
        "file": {"driver": "nbd", "export": "target",
                 "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}}})
    try:
        if not fleecing:
            transaction(monitor, [backup_action(JOB, node, TARGET_NODE)])
            try:
                return write_latencies(dom, disk, size, pattern)
            finally:
                cancel_jobs(monitor, [JOB])
        with guarded_source(monitor, node, disk, size, JOB) as guard:
            guard.insert()
            source, _bitmap = guard.source(None)
            transaction(monitor, [backup_action(JOB, source, TARGET_NODE)])
            try:
                return write_latencies(dom, disk, size, pattern)
            finally:
                cancel_jobs(monitor, [JOB])
    finally:
        with suppress(RdmBackupError):
            monitor.execute("blockdev-del", {"node-name": TARGET_NODE})


def section_guestio(dom: libvirt.virDomain, disk: str, size: int, work: Path
                    ) -> dict[str, Any]:
    """Measure the three runs (see the module); keys start with ``guestio_``."""
    results: dict[str, tuple[list[float], int]] = {
        "no_backup": write_latencies(dom, disk, size, 0x61)}
    with throttled_target(work, size) as port:
        results["direct"] = during_backup(dom, disk, size, port, False, 0x62)
        results["fleecing"] = during_backup(dom, disk, size, port, True, 0x63)
    base = statistics.median(results["no_backup"][0])
    doc: dict[str, Any] = {"guestio_target_bps": TARGET_BPS, "guestio_writes": WRITES}
    for run, (seconds, failed) in results.items():
        median = statistics.median(seconds)
        doc[f"guestio_{run}_median_ms"] = round(median * 1000, 1)
        doc[f"guestio_{run}_worst_ms"] = round(max(seconds) * 1000, 1)
        doc[f"guestio_{run}_failed"] = failed
        doc[f"guestio_{run}_ratio"] = round(median / base, 2) if base else None
    return doc


def print_guestio(doc: dict[str, Any]) -> None:
    """The section's table."""
    print(f"guestio: {doc['guestio_writes']} guest writes of 1 MiB each, during a full "
          f"backup to an NBD target taking {doc['guestio_target_bps'] / MiB:g} MiB/s")
    labels = {"no_backup": "no backup running",
              "direct": "plain blockdev-backup to the target (before)",
              "fleecing": "break-snapshot filter + local fleecing (now)"}
    for run in RUNS:
        print(f"  {labels[run]:<48} median {doc[f'guestio_{run}_median_ms']:>8.1f} ms  "
              f"worst {doc[f'guestio_{run}_worst_ms']:>8.1f} ms  "
              f"ratio {doc[f'guestio_{run}_ratio']}  failed {doc[f'guestio_{run}_failed']}")
    print()
