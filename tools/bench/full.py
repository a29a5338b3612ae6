"""Section ``full``: rdm-backup's full backup of vdb against ``dd`` and libvirt's
``backup-begin`` (raw and qcow2 push targets), ``--repeat`` rounds in a rotated order."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from libvirt_rdm_backup import api
from tools.bench.common import (
    DISK,
    Lab,
    MiB,
    Run,
    allocated_bytes,
    remove_tree,
    same_content,
    say,
    settle,
)
from tools.labkit import domain_type

POLL = 0.02  # seconds between job polls of backup-begin


def run_rdm_backup(domain: str, repo: Path) -> Run:
    """The library's full backup of vdb into a fresh repository."""
    last_progress: list[float] = []

    def progress(_job: str, _done: int, _total: int) -> None:
        last_progress[:] = [time.monotonic()]

    started = time.monotonic()
    result = api.backup(domain, str(repo), disks=[DISK], progress=progress)
    seconds = time.monotonic() - started
    backup_dir = Path(result.path)
    record = result.manifest.disks[0]
    extra = {
        "data_file_bytes": float(allocated_bytes(backup_dir / record.data_file)),
        "manifest_stored_bytes": float(record.stored_bytes),
        "bytes_transferred": float(record.bytes_transferred),
    }
    if last_progress:
        extra["copy_s"] = last_progress[0] - started
    extra["stored_bytes"] = float(allocated_bytes(backup_dir))
    return Run(seconds, backup_dir / record.data_file, extra)


def run_dd(device: str, out: Path) -> Run:
    """dd with direct I/O on both sides: the data is on disk when dd exits."""
    argv = ["dd", f"if={device}", f"of={out}", "bs=4M", "iflag=direct", "oflag=direct",
            "status=none"]
    started = time.monotonic()
    subprocess.run(argv, check=True)
    return Run(time.monotonic() - started, out)


def backup_xml(target: Path, fmt: str) -> str:
    """A push-mode backup of vdb only."""
    return (
        "<domainbackup mode='push'><disks>"
        f"<disk name='{DISK}' backup='yes' type='file'>"
        f"<target file={quoteattr(str(target))}/><driver type='{fmt}'/></disk>"
        "</disks></domainbackup>"
    )


def run_backup_begin(dom: libvirt.virDomain, out: Path, fmt: str) -> Run:
    """libvirt's push-mode backup, timed until the job is gone (polled every 20 ms)."""
    started = time.monotonic()
    dom.backupBegin(backup_xml(out, fmt), None, 0)
    try:
        while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
            time.sleep(POLL)
    except BaseException:
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass
        raise
    seconds = time.monotonic() - started
    stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise RuntimeError(f"backup-begin ({fmt}) did not complete: {stats}")
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    synced = time.monotonic() - started
    extra = {"synced_s": synced, "stored_bytes": float(allocated_bytes(out))}
    if "time_elapsed" in stats:
        extra["libvirt_elapsed_s"] = int(stats["time_elapsed"]) / 1000.0
    return Run(seconds, out, extra)


@dataclass
class Method:
    """A measured method: its label, JSON key and how to run it once."""

    key: str
    label: str
    run: Callable[[Path], Run]
    fmt: str  # format of its output (for the content check)
    runs: list[Run] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def median_extra(self, name: str) -> float | None:
        values = [r.extra[name] for r in self.runs if name in r.extra]
        return statistics.median(values) if values else None


def section_full(lab: Lab) -> dict[str, Any]:
    """rdm-backup against dd and backup-begin, ``--repeat`` rotated rounds."""
    args, work, device, name, dom = lab.args, lab.work, lab.device, lab.name, lab.dom
    methods = [
        Method("rdm_backup_s", "rdm-backup (api.backup)",
               lambda out: run_rdm_backup(name, out), "qcow2"),
        Method("dd_s", "dd bs=4M iflag=direct oflag=direct",
               lambda out: run_dd(device, out), "raw"),
        Method("virsh_backup_begin_s", "backup-begin push, raw target",
               lambda out: run_backup_begin(dom, out, "raw"), "raw"),
    ]
    if not args.no_qcow2:
        methods.append(
            Method("virsh_backup_begin_qcow2_s", "backup-begin push, qcow2 target",
                   lambda out: run_backup_begin(dom, out, "qcow2"), "qcow2"))
    verified: dict[str, bool] = {}
    for round_no in range(args.repeat):
        shift = round_no % len(methods)
        for method in methods[shift:] + methods[:shift]:
            out = work / f"rdmb-{method.key}-{round_no}"
            settle(args)
            try:
                run = method.run(out)
                say(f"round {round_no + 1}/{args.repeat}: {method.label}: "
                    f"{run.seconds:.2f} s")
                method.runs.append(run)
                if round_no == 0 and not args.no_verify:
                    verified[method.key] = same_content(device, run.image, method.fmt)
            finally:
                remove_tree(out)
    return report_doc(args, lab.size, lab.data_bytes, device, methods, verified)


def report_doc(args: argparse.Namespace, size: int, data_bytes: int, device: str,
               methods: list[Method], verified: dict[str, bool]) -> dict[str, Any]:
    by_key = {m.key: m for m in methods}
    ours = by_key["rdm_backup_s"]
    stored = ours.median_extra("stored_bytes") or 0.0
    doc: dict[str, Any] = {
        "lun_bytes": size,
        "data_bytes": data_bytes,
        "fill": args.fill,
        "extent_bytes": args.extent_mib * MiB,
        "zeros": "holes" if args.sparse else "written",
        "repeat": args.repeat,
        "page_cache_dropped": True,
        "settle_s": args.settle,
        "domain_type": domain_type(),
    }
    for method in methods:
        doc[method.key] = round(method.median, 3)
    doc["rdm_backup_copy_s"] = round(ours.median_extra("copy_s") or 0.0, 3)
    bb = by_key["virsh_backup_begin_s"]
    doc["virsh_backup_begin_synced_s"] = round(bb.median_extra("synced_s") or 0.0, 3)
    doc["ratio_vs_dd"] = round(ours.median / by_key["dd_s"].median, 3)
    doc["ratio_vs_backup_begin"] = round(ours.median / bb.median, 3)
    doc["ratio_vs_backup_begin_synced"] = round(
        ours.median / (bb.median_extra("synced_s") or bb.median), 3)
    if "virsh_backup_begin_qcow2_s" in by_key:
        bq = by_key["virsh_backup_begin_qcow2_s"]
        doc["virsh_backup_begin_qcow2_synced_s"] = round(bq.median_extra("synced_s") or 0.0, 3)
        doc["ratio_vs_backup_begin_qcow2"] = round(ours.median / bq.median, 3)
        doc["backup_begin_qcow2_stored_bytes"] = int(bq.median_extra("stored_bytes") or 0)
    doc["backup_begin_raw_stored_bytes"] = int(bb.median_extra("stored_bytes") or 0)
    doc["stored_bytes"] = int(stored)
    doc["stored_ratio_to_data"] = round(stored / data_bytes, 4) if data_bytes else None
    doc["stored_ratio_to_lun"] = round(stored / size, 4)
    doc["verified_identical"] = verified
    doc["runs_s"] = {m.key: [round(r.seconds, 3) for r in m.runs] for m in methods}
    for method in methods:
        for extra in ("copy_s", "synced_s"):
            values = [round(r.extra[extra], 3) for r in method.runs if extra in r.extra]
            if values:
                doc["runs_s"][f"{method.key.removesuffix('_s')}_{extra}"] = values
    doc["device"] = device
    return doc


METHODS_ORDER = [
    ("rdm_backup_s", "rdm-backup (api.backup, whole call)"),
    ("dd_s", "dd bs=4M iflag=direct oflag=direct"),
    ("virsh_backup_begin_s", "backup-begin push -> raw (job done)"),
    ("virsh_backup_begin_synced_s", "backup-begin push -> raw (+ fsync)"),
    ("virsh_backup_begin_qcow2_s", "backup-begin push -> qcow2 (job done)"),
    ("virsh_backup_begin_qcow2_synced_s", "backup-begin push -> qcow2 (+ fsync)"),
]


def print_full(doc: dict[str, Any]) -> None:
    lun = doc["lun_bytes"]
    print("== full backup (rotated order per round)")
    header = f"{'method':<38} {'median s':>9} {'MiB/s':>8} {'rdm/this':>9}  runs (s)"
    print(header)
    print("-" * len(header))
    ours = doc["rdm_backup_s"]
    for key, label in METHODS_ORDER:
        if key not in doc:
            continue
        seconds = doc[key]
        runs = ", ".join(f"{s:.2f}" for s in doc["runs_s"].get(key, [])) or "-"
        rate = lun / MiB / seconds if seconds else 0.0
        ratio = ours / seconds if seconds else 0.0
        print(f"{label:<38} {seconds:>9.3f} {rate:>8.0f} {ratio:>9.3f}  {runs}")
    print()
    print(f"rdm-backup until its copy job ended: {doc['rdm_backup_copy_s']:.3f} s "
          f"(the rest: digest, manifest, fsync, publish)")
    print("ratio = rdm-backup time / other time (below 1: rdm-backup is faster)")
    print(f"  vs dd:                       {doc['ratio_vs_dd']:.3f}")
    print(f"  vs backup-begin (raw):       {doc['ratio_vs_backup_begin']:.3f}"
          f"   (with fsync of its file: {doc['ratio_vs_backup_begin_synced']:.3f})")
    if "ratio_vs_backup_begin_qcow2" in doc:
        print(f"  vs backup-begin (qcow2):     {doc['ratio_vs_backup_begin_qcow2']:.3f}")
    print()
    data = doc["data_bytes"]
    print(f"stored by rdm-backup: {doc['stored_bytes'] / MiB:.2f} MiB for "
          f"{data / MiB:.0f} MiB of data: ratio to data {doc['stored_ratio_to_data']}, "
          f"to the LUN {doc['stored_ratio_to_lun']}")
    print(f"stored by backup-begin: raw {doc['backup_begin_raw_stored_bytes'] / MiB:.2f} MiB"
          + (f", qcow2 {doc['backup_begin_qcow2_stored_bytes'] / MiB:.2f} MiB"
             if "backup_begin_qcow2_stored_bytes" in doc else ""))
    if doc["verified_identical"]:
        checks = ", ".join(f"{k.removesuffix('_s')}={'identical' if v else 'DIFFERENT'}"
                           for k, v in doc["verified_identical"].items())
        print(f"first-round copies vs the LUN (qemu-img compare): {checks}")
    print()
