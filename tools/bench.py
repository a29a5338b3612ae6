"""Full-backup benchmark of a raw LUN: rdm-backup against dd and libvirt's backup-begin.

A file under /var/tmp/rdmb-* becomes a LUN (a loop device). Before anything runs it is
filled on the host side: ``--fill`` of it with random (incompressible) data in scattered
``--extent-mib`` extents, the rest written as zeros. A firmware-only domain (KVM where
available) gets the loop device as ``vdb`` (``<disk type='block' device='disk'>``) and is
started. Then, ``--repeat`` times (median reported), each measured after ``sync``, a
page-cache drop (``echo 3 > /proc/sys/vm/drop_caches``) and a ``--settle`` pause, in an
order rotated per round:

* ``rdm-backup``: :func:`libvirt_rdm_backup.api.backup` of vdb into a fresh repository
  (the whole call: discovery, QEMU job, digest, publish with fsync);
* ``dd``: ``dd if=/dev/loopX of=FILE bs=4M iflag=direct oflag=direct`` (same device, a
  plain file in the same filesystem, on disk when dd exits);
* ``backup-begin``: libvirt push-mode backup (``virDomainBackupBegin``, what ``virsh
  backup-begin`` calls) of vdb to a raw file and (unless ``--no-qcow2``) a qcow2 file,
  timed until the job is gone; the time with an fsync of the result is reported beside it.

Ratios are rdm-backup time / other time (below 1: rdm-backup is faster) and stored bytes
of the backup / bytes of data in the LUN. Nothing is asserted against a threshold.
Everything made (domain, loop device, files) has "rdmb" in its name and is removed in
``finally`` blocks. Needs root and the lab (``make lab-up``).

Usage: ``.venv/bin/python tools/bench.py [--size-mib N] [--fill F] [--repeat N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from xml.sax.saxutils import quoteattr

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import libvirt  # noqa: E402

from libvirt_rdm_backup import api  # noqa: E402
from tests.lab.domains import block_disk, domain_type, test_domain  # noqa: E402
from tests.lab.storage_lab import loop_device, rdmb_tmpdir, unique_name  # noqa: E402

MiB = 1024 * 1024
DISK = "vdb"
POLL = 0.02  # seconds between job polls of backup-begin

log = logging.getLogger("rdmb-bench")


def say(message: str) -> None:
    """Progress on stderr (stdout carries the table and the JSON)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- preparation -----------------------------------------------------------------


def fill_lun(path: Path, size: int, fill: float, extent: int, seed: int, sparse: bool) -> int:
    """Write the LUN's backing file: random extents at scattered places, zeros elsewhere.

    Zeros are written as real blocks (as on an array LUN) unless ``sparse``. The first
    extent stays zero so that the firmware finds no boot sector. Returns the data bytes.
    """
    count = size // extent
    wanted = min(count - 1, round(fill * size / extent))
    chosen = set(random.Random(seed).sample(range(1, count), wanted)) if wanted > 0 else set()
    zeros = bytes(extent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for index in range(count):
            if index in chosen:
                os.pwrite(fd, os.urandom(extent), index * extent)
            elif not sparse:
                os.pwrite(fd, zeros, index * extent)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(chosen) * extent


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache (and dentries/inodes)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as stream:
        stream.write("3\n")


def allocated_bytes(path: Path) -> int:
    """Bytes a file or a directory tree takes on disk (st_blocks)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree (results of one measured run)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def same_content(source: str, image: Path, fmt: str) -> bool:
    """``qemu-img compare`` of the LUN with a copy (shared lock: QEMU has the LUN open)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-U", "-f", "raw", "-F", fmt, source, str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare failed: {proc.stderr.strip()}")
    return proc.returncode == 0


# -- the measured operations ---------------------------------------------------------


@dataclass
class Run:
    """One measured operation: its time and the copy it made."""

    seconds: float
    image: Path
    extra: dict[str, float] = field(default_factory=dict)


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


# -- the bench ------------------------------------------------------------------------


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="LUN size (default 1024)")
    parser.add_argument("--fill", type=float, default=0.25,
                        help="fraction of the LUN holding random data (default 0.25)")
    parser.add_argument("--extent-mib", type=int, default=1,
                        help="size of each random extent (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, median reported")
    parser.add_argument("--seed", type=int, default=1, help="placement of the extents")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after dropping the cache (default 1)")
    parser.add_argument("--sparse", action="store_true",
                        help="leave the zero part of the backing file as holes")
    parser.add_argument("--no-qcow2", action="store_true",
                        help="skip backup-begin to a qcow2 target")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip comparing the first round's copies with the LUN")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.size_mib < 4 or args.size_mib % args.extent_mib:
        parser.error("--size-mib must be >= 4 and a multiple of --extent-mib")
    if not 0.0 <= args.fill <= 1.0:
        parser.error("--fill must be between 0 and 1")
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    say(f"signal {signum}: cleaning up")
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


def bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    with ExitStack() as stack:
        work = stack.enter_context(rdmb_tmpdir())
        lun_file = work / "rdmb-lun.img"
        say(f"filling {lun_file} ({args.size_mib} MiB, {args.fill:.0%} random data)")
        data_bytes = fill_lun(lun_file, size, args.fill, args.extent_mib * MiB, args.seed,
                              args.sparse)
        device = stack.enter_context(loop_device(lun_file))
        name = unique_name("rdmb-bench")
        say(f"starting domain {name} ({domain_type()}) with {DISK} = {device}")
        dom = stack.enter_context(test_domain(name, [block_disk(DISK, device)]))

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
                drop_caches()
                time.sleep(args.settle)
                try:
                    run = method.run(out)
                    say(f"round {round_no + 1}/{args.repeat}: {method.label}: "
                        f"{run.seconds:.2f} s")
                    method.runs.append(run)
                    if round_no == 0 and not args.no_verify:
                        verified[method.key] = same_content(device, run.image, method.fmt)
                finally:
                    remove_tree(out)
        doc = report_doc(args, size, data_bytes, device, methods, verified)
        doc.update(workdir=str(work), domain=name)
        return doc


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


def print_table(doc: dict[str, Any], methods_order: list[tuple[str, str]]) -> None:
    lun = doc["lun_bytes"]
    print(f"LUN: {lun / MiB:.0f} MiB loop device over a file in /var/tmp/rdmb-* "
          f"({doc['data_bytes'] / MiB:.0f} MiB random data in "
          f"{doc['extent_bytes'] // MiB} MiB extents, zeros {doc['zeros']}); "
          f"domain type {doc['domain_type']}")
    print(f"Each run follows `sync; echo 3 > /proc/sys/vm/drop_caches` (page cache dropped) "
          f"and a {doc['settle_s']} s pause; median of {doc['repeat']} round(s), "
          f"order rotated per round.")
    print()
    header = f"{'method':<38} {'median s':>9} {'MiB/s':>8} {'rdm/this':>9}  runs (s)"
    print(header)
    print("-" * len(header))
    ours = doc["rdm_backup_s"]
    for key, label in methods_order:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="bench: %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, drop_caches, qemu:///system)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    doc = bench(args)
    if not args.json:
        print_table(doc, [
            ("rdm_backup_s", "rdm-backup (api.backup, whole call)"),
            ("dd_s", "dd bs=4M iflag=direct oflag=direct"),
            ("virsh_backup_begin_s", "backup-begin push -> raw (job done)"),
            ("virsh_backup_begin_synced_s", "backup-begin push -> raw (+ fsync)"),
            ("virsh_backup_begin_qcow2_s", "backup-begin push -> qcow2 (job done)"),
            ("virsh_backup_begin_qcow2_synced_s", "backup-begin push -> qcow2 (+ fsync)"),
        ])
    print(json.dumps(doc, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
