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
of the backup / bytes of data in the LUN.

The sections (``--sections``, default all of them, run in this order in one process):

* ``full``: the comparison above.
* ``nbd``: the same full backup of vdb pushed to an NBD volume, against the same to a file
  repository and against a bare ``qemu-img convert`` into an NBD export. ``--repeat``
  rounds in a rotated order, each measured after the page-cache drop, of:

  - ``file_target_s``: :func:`api.backup` of vdb into a fresh repository directory (as
    ``rdm-backup`` of ``full``);
  - ``nbd_push_s``: :func:`api.backup` of vdb with ``target="nbd://127.0.0.1:PORT/EXPORT"``
    into a fresh volume file served by ``rdm-backup receive --volume FILE --listen
    127.0.0.1:PORT --export EXPORT --json`` (the VM's QEMU writes the qcow2 layer over NBD);
  - ``qemu_img_convert_nbd_s``: ``qemu-img convert -f raw -O raw /dev/loopX
    nbd://127.0.0.1:PORT2/EXPORT2`` into a plain ``qemu-nbd -f raw --persistent
    --shared=0 -b 127.0.0.1 -p PORT2 -x EXPORT2 FILE`` export of a fresh sparse raw file of
    the LUN's size (raw only: an NBD export is raw), timed as the whole command (it flushes
    the export when it closes it).

  The servers are started (and found listening) before the page-cache drop and stopped by
  pid afterwards (``receive`` with SIGTERM, then its ``qemu-nbd`` by pid if it outlived
  it); the time they take is not measured. Reported: push time / file-target time and
  push time / convert time (no goals: context), and the bytes each result takes on disk
  (``st_blocks``): the volume file after the push / the data in the LUN. It runs right
  after ``full``, before anything rewrites the LUN.
* ``incremental``: ``--repeat`` rounds, in one repository, of: a full backup of vdb
  (``level="full"``), then ``--dirty`` of the LUN (1%) rewritten by the guest side (HMP
  ``qemu-io`` writes of 64 KiB at scattered 64 KiB-aligned offsets, one monitor command
  each), then ``level="incremental"``; each measured after the page-cache drop. Reported:
  incremental time / full time (goal <= 0.05) and bytes the incremental backup takes on
  disk / rewritten bytes (goal <= 1.2). Then another rewrite of the same size and the
  same incremental through the ``rdm-backup`` command (a whole process, like the peer's).
* ``peer``: Debian's ``virtnbdbackup`` on a qcow2 disk of the same size and the same data
  (``qemu-img convert`` of the freshly filled LUN file, so its zeros are not allocated) as
  ``vdb`` of a second firmware-only domain: ``-l full`` then, after the same rewrites,
  ``-l inc``, each timed as a whole command. Reported: our raw-LUN incremental time / its
  qcow2 incremental time (goal <= 1.0) and both full times. Its libvirt checkpoints are
  deleted between rounds and at the end, before the domain is undefined.
* ``resync``: a resync after a domain restart (QEMU's dirty bitmaps gone) with 1% changed:
  time / full time and bytes stored. Measured only when the library offers the level
  ``resync`` (:class:`libvirt_rdm_backup.modes.Level`); otherwise reported as not
  measured.
* ``lun``: SCSI passthrough LUNs backed up through storage snapshots. Two iSCSI LUNs of
  ``--size-mib`` each (the same ``--fill`` of random data), served by the lab's tgtd from
  files on the lab's reflink XFS (so the ``tgt-reflink`` storage agent snapshots them),
  attached as ``device='lun'`` ``sda`` and ``sdb`` on virtio-scsi, and a loop device of the
  same size and data as ``vdb`` (``<disk type='block' device='disk'>``), in a third
  firmware-only domain. Measured, each after the page-cache drop:

  - the pause window: ``--repeat`` full backups of all three disks (:func:`api.backup`);
    ``manifest.consistency["paused_ms"]`` (median; goal <= 100 ms) and its method;
  - the window under load: 20 backups of all three (a full, then incrementals) while a
    ``dd`` keeps rewriting ``sdb``'s backing file through the page cache (16 MiB, a pause
    of 0.25 s, again): p50 and worst of ``paused_ms`` (goal: worst <= 100 ms);
  - ``--repeat`` rounds, each in a fresh repository, of a full backup of ``sda`` alone and
    ``qemu-img convert -f raw -O raw iscsi://127.0.0.1:3260/IQN/1 FILE`` and ``-O qcow2``
    of the same LUN (rotated order): backup time / convert time; then ``--dirty`` of
    ``sda`` rewritten by the guest side (as in ``incremental``, on the LUN's qdev) and an
    incremental backup of ``sda``: time / full time and bytes it takes on disk /
    rewritten bytes; the data path and level of every disk are reported (``snapshot``,
    ``incremental``: the point came from a storage snapshot and only the ranges the
    storage reports as changed were read).

  The storage snapshots the repositories keep (clones in ``.rdmb-snapshots`` beside the
  backing files, tgt targets presenting them) are deleted before the repositories.

* ``guestio``: guest write latency during a backup to a throttled NBD target, with a
  plain ``blockdev-backup`` job (as before) and with the tool's break-snapshot filter and
  local fleecing image, as ratios to no backup running (see ``tools/bench_guestio.py``).

Goals are printed beside the ratios; nothing is asserted against a threshold.
Everything made (domains, loop devices, iSCSI targets, files, storage snapshots,
checkpoints, NBD exports) has "rdmb" in its name (the peer's checkpoints are named by it,
on an rdmb domain) and is removed in ``finally`` blocks; NBD servers are stopped by pid.
Needs root and the lab (``make lab-up``); the peer section needs ``virtnbdbackup``.

Usage: ``.venv/bin/python tools/bench.py [--size-mib N] [--fill F] [--repeat N]
[--sections full,nbd,incremental,peer,resync,lun,guestio] [--dirty F] [--json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from xml.sax.saxutils import quoteattr

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import libvirt  # noqa: E402
from bench_guestio import print_guestio, section_guestio  # noqa: E402

from libvirt_rdm_backup import api, modes  # noqa: E402
from libvirt_rdm_backup.engine.backup import BackupResult  # noqa: E402
from libvirt_rdm_backup.errors import RdmBackupError  # noqa: E402
from libvirt_rdm_backup.storage import tgt  # noqa: E402
from libvirt_rdm_backup.storage.snapshot_agents import agent_by_name  # noqa: E402
from libvirt_rdm_backup.storage.snapshots import SNAPSHOT_DIR, StorageSnapshot  # noqa: E402
from tests.lab.domains import (  # noqa: E402
    URI,
    block_disk,
    domain_type,
    guest_write,
    iscsi_disk,
    qcow2_disk,
    qemu_leftovers,
    test_domain,
)
from tests.lab.storage_lab import (  # noqa: E402
    IscsiLun,
    iscsi_target,
    loop_device,
    rdmb_reflink_tmpdir,
    rdmb_tmpdir,
    unique_name,
)

MiB = 1024 * 1024
KiB = 1024
DISK = "vdb"
POLL = 0.02  # seconds between job polls of backup-begin
SECTIONS = ("full", "nbd", "incremental", "peer", "resync", "lun", "guestio")
LUNS = ("sda", "sdb")  # the lun section's passthrough LUNs; sda is the one measured alone
LUN_BLOCK = "vdb"  # the lun section's block-layer disk
WRITE = 64 * KiB  # size and alignment of each simulated guest write
# goals of the incremental sections, printed beside the measured ratios (never asserted)
GOALS = {
    "incremental_ratio_to_full": 0.05,
    "incremental_stored_ratio_to_dirty": 1.2,
    "ratio_inc_vs_virtnbdbackup_inc": 1.0,
    # lun section: the guest held at most 100 ms; a full backup of a LUN from a storage
    # snapshot about as fast as a bare qemu-img convert of it; the incremental as above
    "lun_paused_ms": 100.0,
    "lun_loaded_paused_worst_ms": 100.0,
    "lun_full_ratio_vs_convert_raw": 1.25,
    "lun_full_ratio_vs_convert_qcow2": 1.1,
    "lun_inc_ratio_to_full": 0.05,
    "lun_inc_stored_ratio_to_dirty": 1.2,
}
RESYNC_UNAVAILABLE = "not measured (level not available)"

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


def same_content(source: str, image: Path | str, fmt: str) -> bool:
    """``qemu-img compare`` of the LUN with a copy (shared lock: QEMU has the LUN open).

    ``image`` is a file or a ``json:`` filename (a qcow2 layer inside an NBD volume file).
    """
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
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated sections to run, of "
                             f"{','.join(SECTIONS)} (default: all)")
    parser.add_argument("--windows", type=int, default=LOADED_WINDOWS,
                        help="lun: windows measured under a dd load (default %(default)s)")
    parser.add_argument("--dirty", type=float, default=0.01,
                        help="fraction of the LUN rewritten before an incremental "
                             "(default 0.01)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        parser.error(f"--sections: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {','.join(SECTIONS)}")
    args.sections = [name for name in SECTIONS if name in chosen]
    if not 0.0 < args.dirty <= 0.5:
        parser.error("--dirty must be above 0 and at most 0.5")
    if args.size_mib < 4 or args.size_mib % args.extent_mib:
        parser.error("--size-mib must be >= 4 and a multiple of --extent-mib")
    if not 0.0 <= args.fill <= 1.0:
        parser.error("--fill must be between 0 and 1")
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.windows < 1:
        parser.error("--windows must be >= 1")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    say(f"signal {signum}: cleaning up")
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


@dataclass
class Lab:
    """What the sections share: the LUN, its loop device and the running domain."""

    args: argparse.Namespace
    work: Path
    size: int
    data_bytes: int
    lun_file: Path
    device: str = ""
    name: str = ""
    dom: libvirt.virDomain | None = None
    peer_image: Path | None = None
    full_s: float | None = None  # our full backup time in the incremental section


def settle(args: argparse.Namespace) -> None:
    """What precedes every measured operation: sync, page-cache drop, a pause."""
    drop_caches()
    time.sleep(args.settle)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    doc: dict[str, Any] = {"sections": list(args.sections)}
    with ExitStack() as stack:
        work = stack.enter_context(rdmb_tmpdir())
        lun_file = work / "rdmb-lun.img"
        data_bytes = 0
        if set(args.sections) - {"lun"}:  # the lun section fills LUNs of its own
            say(f"filling {lun_file} ({args.size_mib} MiB, {args.fill:.0%} random data)")
            data_bytes = fill_lun(lun_file, size, args.fill, args.extent_mib * MiB,
                                  args.seed, args.sparse)
        lab = Lab(args, work, size, data_bytes, lun_file)
        if "peer" in args.sections:
            # the same data before anything writes to the LUN; zeros stay unallocated
            lab.peer_image = work / "rdmb-peer.qcow2"
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                            str(lun_file), str(lab.peer_image)], check=True)
        if set(args.sections) & {"full", "nbd", "incremental", "resync", "guestio"}:
            lab.device = stack.enter_context(loop_device(lun_file))
            lab.name = unique_name("rdmb-bench")
            say(f"starting domain {lab.name} ({domain_type()}) with {DISK} = {lab.device}")
            lab.dom = stack.enter_context(test_domain(lab.name, [block_disk(DISK, lab.device)]))
            doc.update(domain=lab.name, device=lab.device)
        doc.update(lun_bytes=size, data_bytes=data_bytes, fill=args.fill,
                   extent_bytes=args.extent_mib * MiB,
                   zeros="holes" if args.sparse else "written", page_cache_dropped=True,
                   domain_type=domain_type(), settle_s=args.settle, repeat=args.repeat)
        if "full" in args.sections:
            doc.update(section_full(lab))
        if "nbd" in args.sections:
            doc.update(section_nbd(lab))
        if "incremental" in args.sections:
            doc.update(section_incremental(lab))
        if "peer" in args.sections:
            doc.update(section_peer(lab, doc))
        if "resync" in args.sections:
            doc.update(section_resync(lab))
        if "lun" in args.sections:
            doc.update(section_lun(lab))
            if not data_bytes:  # the same --fill and --seed as the shared LUN's
                doc["data_bytes"] = doc["lun_data_bytes"]
        if "guestio" in args.sections:
            assert lab.dom is not None
            doc.update(section_guestio(lab.dom, DISK, size, work))
        doc["goals"] = {k: v for k, v in GOALS.items() if k in doc}
        doc["workdir"] = str(work)
        return doc


# -- section: full ------------------------------------------------------------------


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


# -- section: nbd ---------------------------------------------------------------------


NBD_EXPORT = "rdmb-bench-vol"  # the export of `rdm-backup receive` (an NBD volume)
NBD_PLAIN_EXPORT = "rdmb-bench-raw"  # the plain qemu-nbd export qemu-img convert writes into
NBD_METHODS = ("file_target_s", "nbd_push_s", "qemu_img_convert_nbd_s")
SERVER_WAIT = 20.0  # seconds a server gets to listen
SERVER_STOP = 10.0  # seconds a server gets to exit after SIGTERM


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (``/proc/PID/task/*/children``)."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as stream:
                found.update(int(value) for value in stream.read().split())
        except OSError:
            pass
    return sorted(found)


def alive_as(pid: int, comm: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process named ``comm``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
            stat = stream.read()
    except OSError:
        return False
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    state = stat[stat.rindex(")") + 2:].split()[0]
    return name == comm and state not in ("Z", "X")


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class NbdServer:
    """A server on 127.0.0.1 (``rdm-backup receive`` or ``qemu-nbd``), known by its pids."""

    what: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    children: list[int] = field(default_factory=list)  # receive's qemu-nbd
    problems: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *self.children]


def wait_listening(server: NbdServer) -> None:
    """Until something accepts connections on the server's port (or it exits)."""
    deadline = time.monotonic() + SERVER_WAIT
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.what} exited ({server.proc.returncode}) before "
                               f"listening on 127.0.0.1:{server.port}: {log_tail(server.log)}")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.what} did not listen on 127.0.0.1:{server.port} "
                                   f"within {SERVER_WAIT:g} s: {log_tail(server.log)}") from None
            time.sleep(0.05)


def stop_server(server: NbdServer) -> None:
    """SIGTERM to the server's pid (SIGKILL after 10 s); then any child that outlived it."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SERVER_STOP)
        except subprocess.TimeoutExpired:
            server.problems.append(f"{server.what} (pid {proc.pid}) ignored SIGTERM: killed")
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.returncode != 0:
        server.problems.append(f"{server.what} (pid {proc.pid}) exited with "
                               f"{proc.returncode}: {log_tail(server.log)}")
    for pid in server.children:
        deadline = time.monotonic() + SERVER_STOP
        while alive_as(pid, "qemu-nbd") and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive_as(pid, "qemu-nbd"):
            server.problems.append(f"qemu-nbd (pid {pid}) outlived {server.what}: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for problem in server.problems:
        say(f"nbd: {problem}")


@contextmanager
def nbd_server(what: str, argv: list[str], port: int, log: Path,
               announced: str | None = None) -> Iterator[NbdServer]:
    """A server process listening on 127.0.0.1:``port``; stopped by pid on exit.

    ``announced``: the URI it prints first as one JSON line (``receive --json``).
    """
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err,
                                stdout=subprocess.PIPE if announced else subprocess.DEVNULL)
    server = NbdServer(what, proc, port, log)
    try:
        if announced is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            try:
                uri = json.loads(line)["uri"]
            except (ValueError, KeyError, TypeError):
                raise RuntimeError(f"{what} announced {line!r}: {log_tail(log)}") from None
            if uri != announced:
                raise RuntimeError(f"{what} serves {uri}, not {announced}")
        wait_listening(server)
        server.children = child_pids(proc.pid)
        yield server
    finally:
        stop_server(server)


def run_nbd_push(domain: str, uri: str, volume: Path) -> tuple[Run, dict[str, Any]]:
    """The library's full backup of vdb pushed to an NBD volume; the run and its location."""
    last_progress: list[float] = []

    def progress(_job: str, _done: int, _total: int) -> None:
        last_progress[:] = [time.monotonic()]

    started = time.monotonic()
    result = api.backup(domain, uri, disks=[DISK], progress=progress)
    seconds = time.monotonic() - started
    record = result.manifest.disks[0]
    if record.level != "full":
        raise RuntimeError(f"a backup into a fresh NBD volume was a {record.level}: "
                           f"{record.reason}")
    extra = {
        "manifest_stored_bytes": float(record.stored_bytes),
        "bytes_transferred": float(record.bytes_transferred),
    }
    if last_progress:
        extra["copy_s"] = last_progress[0] - started
    return Run(seconds, volume, extra), dict(record.location or {})


def volume_layer(volume: Path, location: dict[str, Any]) -> str:
    """A ``json:`` filename of a disk's qcow2 layer inside a volume file (for ``-F qcow2``)."""
    return "json:" + json.dumps({"file": {
        "driver": "raw", "offset": int(location["offset"]), "size": int(location["region"]),
        "file": {"driver": "file", "filename": str(volume)}}})


@dataclass
class NbdRound:
    """What one measured run of the nbd section leaves for the report."""

    run: Run
    verified: bool | None = None
    servers: list[NbdServer] = field(default_factory=list)


def nbd_file_target(lab: Lab, round_no: int, verify: bool) -> NbdRound:
    """:func:`api.backup` of vdb into a fresh repository directory."""
    repo = lab.work / f"rdmb-nbd-file-repo-{round_no}"
    try:
        settle(lab.args)
        run = run_rdm_backup(lab.name, repo)
        same = same_content(lab.device, run.image, "qcow2") if verify else None
    finally:
        remove_tree(repo)
    return NbdRound(run, same)


def nbd_push(lab: Lab, round_no: int, verify: bool) -> NbdRound:
    """:func:`api.backup` of vdb into a fresh volume served by ``rdm-backup receive``."""
    volume = lab.work / f"rdmb-nbd-volume-{round_no}.img"
    log = lab.work / f"rdmb-nbd-receive-{round_no}.log"
    port = free_port()
    uri = f"nbd://127.0.0.1:{port}/{NBD_EXPORT}"
    argv = [*rdm_backup_argv(), "receive", "--volume", str(volume), "--listen",
            f"127.0.0.1:{port}", "--export", NBD_EXPORT, "--json"]
    servers: list[NbdServer] = []
    try:
        with nbd_server("rdm-backup receive", argv, port, log, announced=uri) as server:
            servers.append(server)
            settle(lab.args)
            run, location = run_nbd_push(lab.name, uri, volume)
        # the server is gone: the volume file holds everything that was pushed
        run.extra["volume_stored_bytes"] = float(allocated_bytes(volume))
        run.extra["volume_size_bytes"] = float(volume.stat().st_size)
        same = (same_content(lab.device, volume_layer(volume, location), "qcow2")
                if verify else None)
    finally:
        remove_tree(volume)
        remove_tree(log)
    return NbdRound(run, same, servers)


def nbd_convert(lab: Lab, round_no: int, verify: bool) -> NbdRound:
    """``qemu-img convert`` of the LUN into a plain qemu-nbd export of a fresh sparse file."""
    image = lab.work / f"rdmb-nbd-plain-{round_no}.raw"
    log = lab.work / f"rdmb-nbd-qemu-nbd-{round_no}.log"
    port = free_port()
    url = f"nbd://127.0.0.1:{port}/{NBD_PLAIN_EXPORT}"
    argv = ["qemu-nbd", "-f", "raw", "--persistent", "--shared=0", "-b", "127.0.0.1",
            "-p", str(port), "-x", NBD_PLAIN_EXPORT, str(image)]
    servers: list[NbdServer] = []
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, lab.size)
        finally:
            os.close(fd)
        with nbd_server("qemu-nbd", argv, port, log) as server:
            servers.append(server)
            settle(lab.args)
            seconds = run_convert(lab.device, url, "raw")
        run = Run(seconds, image, {"stored_bytes": float(allocated_bytes(image))})
        same = same_content(lab.device, image, "raw") if verify else None
    finally:
        remove_tree(image)
        remove_tree(log)
    return NbdRound(run, same, servers)


def section_nbd(lab: Lab) -> dict[str, Any]:
    """NBD SECTION: push to an NBD volume vs a file repository vs qemu-img convert into NBD."""
    args = lab.args
    assert lab.dom is not None
    measure = {"file_target_s": nbd_file_target, "nbd_push_s": nbd_push,
               "qemu_img_convert_nbd_s": nbd_convert}
    labels = {"file_target_s": "rdm-backup -> file repository",
              "nbd_push_s": "rdm-backup -> NBD volume (receive)",
              "qemu_img_convert_nbd_s": "qemu-img convert -O raw -> qemu-nbd"}
    runs: dict[str, list[Run]] = {key: [] for key in NBD_METHODS}
    verified: dict[str, bool] = {}
    pids: list[int] = []
    problems: list[str] = []
    for round_no in range(args.repeat):
        shift = round_no % len(NBD_METHODS)
        for key in NBD_METHODS[shift:] + NBD_METHODS[:shift]:
            done = measure[key](lab, round_no, round_no == 0 and not args.no_verify)
            for server in done.servers:
                pids += server.pids
                problems += server.problems
            if done.verified is not None:
                verified[key] = done.verified
            runs[key].append(done.run)
            say(f"nbd round {round_no + 1}/{args.repeat}: {labels[key]}: "
                f"{done.run.seconds:.2f} s")

    def med(key: str, extra: str | None = None) -> float:
        if extra is None:
            return median([r.seconds for r in runs[key]])
        return median([r.extra[extra] for r in runs[key] if extra in r.extra])

    file_s, push_s = med("file_target_s"), med("nbd_push_s")
    convert_s = med("qemu_img_convert_nbd_s")
    data = lab.data_bytes
    volume_stored = med("nbd_push_s", "volume_stored_bytes")
    file_stored = med("file_target_s", "stored_bytes")
    convert_stored = med("qemu_img_convert_nbd_s", "stored_bytes")

    def to_data(value: float) -> float | None:
        return round(value / data, 4) if data else None

    runs_s: dict[str, list[float]] = {key: [round(r.seconds, 3) for r in values]
                                      for key, values in runs.items()}
    for key in ("file_target_s", "nbd_push_s"):
        runs_s[f"{key.removesuffix('_s')}_copy_s"] = [
            round(r.extra["copy_s"], 3) for r in runs[key] if "copy_s" in r.extra]
    return {
        "nbd_export": NBD_EXPORT,
        "nbd_plain_export": NBD_PLAIN_EXPORT,
        "file_target_s": round(file_s, 3),
        "nbd_push_s": round(push_s, 3),
        "qemu_img_convert_nbd_s": round(convert_s, 3),
        "file_target_copy_s": round(med("file_target_s", "copy_s"), 3),
        "nbd_push_copy_s": round(med("nbd_push_s", "copy_s"), 3),
        "ratio_nbd_push_vs_file_target": round(push_s / file_s, 3),
        "ratio_nbd_push_vs_convert_nbd": round(push_s / convert_s, 3),
        "nbd_volume_stored_bytes": int(volume_stored),
        "nbd_volume_stored_ratio_to_data": to_data(volume_stored),
        "nbd_volume_stored_ratio_to_file_target":
            round(volume_stored / file_stored, 4) if file_stored else None,
        "nbd_volume_size_bytes": int(med("nbd_push_s", "volume_size_bytes")),
        "nbd_push_manifest_stored_bytes": int(med("nbd_push_s", "manifest_stored_bytes")),
        "nbd_push_bytes_transferred": int(med("nbd_push_s", "bytes_transferred")),
        "file_target_stored_bytes": int(file_stored),
        "file_target_stored_ratio_to_data": to_data(file_stored),
        "qemu_img_convert_nbd_stored_bytes": int(convert_stored),
        "qemu_img_convert_nbd_stored_ratio_to_data": to_data(convert_stored),
        "nbd_verified_identical": verified,
        "nbd_runs_s": runs_s,
        "nbd_server_pids": sorted(set(pids)),
        "nbd_server_problems": problems,
        "nbd_qemu_leftovers": qemu_leftovers(lab.dom),
    }


# -- sections: incremental, peer, resync ---------------------------------------------


def dirty_offsets(size: int, fraction: float, seed: str) -> list[int]:
    """Distinct 64 KiB-aligned offsets, in random order, covering ``fraction`` of the disk.

    The first 64 KiB are left alone (no boot sector appears for the firmware).
    """
    slots = size // WRITE
    count = max(1, min(slots - 1, round(fraction * size / WRITE)))
    return [slot * WRITE for slot in random.Random(seed).sample(range(1, slots), count)]


def rewrite(dom: libvirt.virDomain, offsets: list[int], pattern: int, disk: str = DISK) -> int:
    """Guest-side writes of 64 KiB at each offset (one HMP ``qemu-io`` each); the bytes."""
    for offset in offsets:
        guest_write(dom, disk, pattern, offset, WRITE)
    return len(offsets) * WRITE


@dataclass
class Taken:
    """One backup taken through the API, timed as the whole call."""

    seconds: float
    level: str
    stored_bytes: int  # what the backup's directory takes on disk (st_blocks)
    manifest_stored_bytes: int
    bytes_transferred: int
    image: Path


def timed_backup(domain: str, repo: Path, level: str) -> Taken:
    """:func:`api.backup` of vdb at ``level``; the level it reports is checked."""
    started = time.monotonic()
    result = api.backup(domain, str(repo), disks=[DISK], level=level)
    seconds = time.monotonic() - started
    record = result.manifest.disks[0]
    if level != "auto" and record.level != level:
        raise RuntimeError(f"asked for a {level} backup, got {record.level}: {record.reason}")
    backup_dir = Path(result.path)
    return Taken(seconds, record.level, allocated_bytes(backup_dir), record.stored_bytes,
                 record.bytes_transferred, backup_dir / record.data_file)


def rdm_backup_argv() -> list[str]:
    """How to run the ``rdm-backup`` command: the venv's script, else the module."""
    exe = REPO_ROOT / ".venv" / "bin" / "rdm-backup"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "libvirt_rdm_backup.cli"]


def cli_backup(domain: str, repo: Path, level: str) -> float:
    """The ``rdm-backup`` command (a whole process) backing up vdb at ``level``."""
    argv = rdm_backup_argv()
    argv += ["--json", "backup", domain, "--target", str(repo), "--disk", DISK,
             "--level", level]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"rdm-backup backup --level {level} failed: {proc.stderr.strip()}")
    reported = json.loads(proc.stdout)["level"]
    if reported != level:
        raise RuntimeError(f"rdm-backup backup --level {level} made a {reported} backup")
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def section_incremental(lab: Lab) -> dict[str, Any]:
    """Full, 1% rewritten, incremental (API); then 1% more and incremental (command)."""
    args = lab.args
    assert lab.dom is not None
    repo = lab.work / "rdmb-inc-repo"
    fulls: list[Taken] = []
    incs: list[Taken] = []
    cli_runs: list[float] = []
    dirty = writes = 0
    verified: bool | None = None
    try:
        for round_no in range(args.repeat):
            settle(args)
            full = timed_backup(lab.name, repo, "full")
            offsets = dirty_offsets(lab.size, args.dirty, f"rdmb-dirty-{args.seed}-{round_no}")
            dirty, writes = rewrite(lab.dom, offsets, 0x40 + round_no), len(offsets)
            settle(args)
            inc = timed_backup(lab.name, repo, "incremental")
            say(f"incremental round {round_no + 1}/{args.repeat}: full {full.seconds:.2f} s, "
                f"{writes} x 64 KiB rewritten, incremental {inc.seconds:.3f} s, "
                f"stored {inc.stored_bytes / MiB:.2f} MiB")
            if round_no == 0 and not args.no_verify:
                verified = same_content(lab.device, inc.image, "qcow2")
            more = dirty_offsets(lab.size, args.dirty, f"rdmb-dirty-cli-{args.seed}-{round_no}")
            rewrite(lab.dom, more, 0x60 + round_no)
            settle(args)
            cli_runs.append(cli_backup(lab.name, repo, "incremental"))
            say(f"incremental round {round_no + 1}/{args.repeat}: rdm-backup command "
                f"{cli_runs[-1]:.3f} s")
            fulls.append(full)
            incs.append(inc)
    finally:
        remove_tree(repo)
    full_s = median([t.seconds for t in fulls])
    inc_s = median([t.seconds for t in incs])
    stored = int(median([float(t.stored_bytes) for t in incs]))
    lab.full_s = full_s
    return {
        "dirty_fraction": args.dirty,
        "dirty_writes": writes,
        "write_bytes": WRITE,
        "dirty_bytes": dirty,
        "incremental_full_s": round(full_s, 3),
        "incremental_s": round(inc_s, 3),
        "incremental_ratio_to_full": round(inc_s / full_s, 4),
        "incremental_stored_bytes": stored,
        "incremental_manifest_stored_bytes":
            int(median([float(t.manifest_stored_bytes) for t in incs])),
        "incremental_bytes_transferred":
            int(median([float(t.bytes_transferred) for t in incs])),
        "incremental_stored_ratio_to_dirty": round(stored / dirty, 4),
        "incremental_cli_s": round(median(cli_runs), 3),
        "incremental_verified_identical": verified,
        "incremental_runs_s": {
            "full": [round(t.seconds, 3) for t in fulls],
            "incremental": [round(t.seconds, 3) for t in incs],
            "incremental_cli": [round(v, 3) for v in cli_runs],
        },
    }


def virtnbdbackup_version() -> str:
    proc = subprocess.run(["virtnbdbackup", "--version"], capture_output=True, text=True,
                          check=False)
    return (proc.stdout or proc.stderr).strip()


def run_virtnbdbackup(domain: str, level: str, out: Path, rundir: Path) -> float:
    """One ``virtnbdbackup`` command, timed as a whole; its socket and scratch in ``rundir``."""
    argv = ["virtnbdbackup", "-U", URI, "-d", domain, "-l", level, "-i", DISK,
            "-o", str(out), "--noprogress", "-S", str(rundir),
            "-f", str(rundir / "rdmb-virtnbdbackup.sock")]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"virtnbdbackup -l {level} failed ({proc.returncode}):\n{tail}")
    return seconds


def delete_checkpoints(dom: libvirt.virDomain) -> None:
    """Every checkpoint of the domain, children first (metadata only where that fails)."""
    checkpoints = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    for checkpoint in reversed(checkpoints):
        try:
            checkpoint.delete(0)
        except libvirt.libvirtError:
            checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


@contextmanager
def peer_domain(name: str, image: Path) -> Iterator[libvirt.virDomain]:
    """A domain with the qcow2 image as vdb; its checkpoints and itself removed afterwards."""
    try:
        with test_domain(name, [qcow2_disk(DISK, str(image))]) as dom:
            try:
                yield dom
            finally:
                try:
                    delete_checkpoints(dom)
                except libvirt.libvirtError as err:
                    say(f"could not delete the checkpoints of {name}: {err}")
    finally:
        # libvirt refuses to undefine a domain with checkpoint metadata left
        conn = libvirt.open(URI)
        try:
            try:
                left = conn.lookupByName(name)
            except libvirt.libvirtError:
                left = None
            if left is not None:
                if left.isActive():
                    left.destroy()
                left.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        finally:
            conn.close()


def section_peer(lab: Lab, doc: dict[str, Any]) -> dict[str, Any]:
    """virtnbdbackup full, the same rewrites, virtnbdbackup inc, on a qcow2 copy of the LUN."""
    args = lab.args
    assert lab.peer_image is not None
    rundir = lab.work / "rdmb-virtnbdbackup-run"
    rundir.mkdir()
    os.chmod(rundir, 0o1777)  # QEMU (user libvirt-qemu) binds the NBD socket here
    name = unique_name("rdmb-bench-peer")
    version = virtnbdbackup_version()
    fulls: list[float] = []
    incs: list[float] = []
    full_stored: list[float] = []
    inc_stored: list[float] = []
    dirty = 0
    say(f"starting domain {name} with {DISK} = {lab.peer_image.name} for {version}")
    with peer_domain(name, lab.peer_image) as dom:
        for round_no in range(args.repeat):
            delete_checkpoints(dom)  # each round starts a new checkpoint chain
            out = lab.work / f"rdmb-virtnbdbackup-{round_no}"
            try:
                settle(args)
                fulls.append(run_virtnbdbackup(name, "full", out, rundir))
                offsets = dirty_offsets(lab.size, args.dirty,
                                        f"rdmb-dirty-{args.seed}-{round_no}")
                dirty = rewrite(dom, offsets, 0x40 + round_no)
                settle(args)
                incs.append(run_virtnbdbackup(name, "inc", out, rundir))
                full_stored.append(float(sum(
                    allocated_bytes(f) for f in out.glob(f"{DISK}.full.data"))))
                inc_stored.append(float(sum(
                    allocated_bytes(f) for f in out.glob(f"{DISK}.inc.*.data"))))
                say(f"peer round {round_no + 1}/{args.repeat}: virtnbdbackup full "
                    f"{fulls[-1]:.2f} s, inc {incs[-1]:.3f} s")
            finally:
                remove_tree(out)
    result: dict[str, Any] = {
        "peer": version,
        "peer_domain": name,
        "peer_dirty_bytes": dirty,
        "virtnbdbackup_full_s": round(median(fulls), 3),
        "virtnbdbackup_inc_s": round(median(incs), 3),
        "virtnbdbackup_full_stored_bytes": int(median(full_stored)),
        "virtnbdbackup_inc_stored_bytes": int(median(inc_stored)),
        "virtnbdbackup_runs_s": {"full": [round(v, 3) for v in fulls],
                                 "inc": [round(v, 3) for v in incs]},
    }
    inc_vnb = median(incs)
    if "incremental_s" in doc:
        result["ratio_inc_vs_virtnbdbackup_inc"] = round(doc["incremental_s"] / inc_vnb, 3)
        result["ratio_inc_cli_vs_virtnbdbackup_inc"] = round(
            doc["incremental_cli_s"] / inc_vnb, 3)
        result["ratio_full_vs_virtnbdbackup_full"] = round(
            doc["incremental_full_s"] / median(fulls), 3)
    return result


def section_resync(lab: Lab) -> dict[str, Any]:
    """RESYNC SECTION: resync after a restart with 1% changed: time / full time, bytes stored.

    Measured only when the library offers ``level="resync"``
    (:class:`libvirt_rdm_backup.modes.Level`): a full backup into a fresh repository,
    the domain destroyed and started again (QEMU's dirty bitmaps are gone), ``--dirty`` of
    the LUN rewritten, then a ``resync`` backup, each after the page-cache drop. Reported:
    resync time / that full's time and the bytes the resync backup takes / rewritten bytes.
    """
    if "resync" not in {level.value for level in modes.Level}:
        print(f"resync: {RESYNC_UNAVAILABLE}", file=sys.stderr, flush=True)
        return {"resync": RESYNC_UNAVAILABLE}
    args = lab.args
    assert lab.dom is not None
    repo = lab.work / "rdmb-resync-repo"
    fulls: list[Taken] = []
    resyncs: list[Taken] = []
    dirty = 0
    verified: bool | None = None
    try:
        for round_no in range(args.repeat):
            settle(args)
            fulls.append(timed_backup(lab.name, repo, "full"))
            lab.dom.destroy()
            lab.dom.create()
            offsets = dirty_offsets(lab.size, args.dirty,
                                    f"rdmb-dirty-resync-{args.seed}-{round_no}")
            dirty = rewrite(lab.dom, offsets, 0x70 + round_no)
            settle(args)
            resyncs.append(timed_backup(lab.name, repo, "resync"))
            say(f"resync round {round_no + 1}/{args.repeat}: full {fulls[-1].seconds:.2f} s, "
                f"resync {resyncs[-1].seconds:.3f} s ({resyncs[-1].level})")
            if round_no == 0 and not args.no_verify:
                verified = same_content(lab.device, resyncs[-1].image, "qcow2")
    finally:
        remove_tree(repo)
    full_s = median([t.seconds for t in fulls])
    resync_s = median([t.seconds for t in resyncs])
    stored = int(median([float(t.stored_bytes) for t in resyncs]))
    return {
        "resync": "measured",
        "resync_level": resyncs[-1].level,
        "resync_dirty_bytes": dirty,
        "resync_full_s": round(full_s, 3),
        "resync_s": round(resync_s, 3),
        "resync_ratio_to_full": round(resync_s / full_s, 4),
        "resync_stored_bytes": stored,
        "resync_stored_ratio_to_dirty": round(stored / dirty, 4),
        "resync_verified_identical": verified,
        "resync_runs_s": {"full": [round(t.seconds, 3) for t in fulls],
                          "resync": [round(t.seconds, 3) for t in resyncs]},
    }

# -- section: lun ------------------------------------------------------------------------


def disk_paths(result: BackupResult) -> dict[str, dict[str, str | None]]:
    """Per disk of a backup: its data path, its level and the storage agent of its snapshot."""
    return {
        record.disk.target: {
            "data_path": record.data_path,
            "level": record.level,
            "agent": (record.storage_snapshot or {}).get("agent"),
        }
        for record in result.manifest.disks
    }


def timed_api_backup(domain: str, repo: Path, disks: list[str] | None,
                     level: str) -> tuple[float, BackupResult]:
    """:func:`api.backup` of ``disks`` (all raw disks for None), timed as the whole call."""
    started = time.monotonic()
    result = api.backup(domain, str(repo), disks=disks, level=level)
    return time.monotonic() - started, result


def run_convert(url: str, out: Path | str, fmt: str) -> float:
    """``qemu-img convert -f raw -O FMT URL OUT`` of a LUN (``out``: a file or an NBD URL),
    timed as the whole command."""
    argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt, url, str(out)]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return seconds


def drop_storage_snapshots(repo: Path) -> int:
    """Delete the storage snapshots a repository's backups keep; the number recorded.

    Run before the repository is removed: the snapshots (reflink clones beside the
    LUN's backing file) outlive it otherwise.
    """
    if not repo.exists():
        return 0
    try:
        manifests = api.list_backups(str(repo))
    except RdmBackupError as err:
        say(f"cannot read {repo} to delete its storage snapshots: {err}")
        return 0
    count = 0
    for manifest in manifests:
        for record in manifest.disks:
            data = record.storage_snapshot
            if not data:
                continue
            count += 1
            try:
                snap = StorageSnapshot.from_dict(data)
                agent_by_name(snap.agent).delete(record.disk, snap)
            except (RdmBackupError, KeyError, TypeError, ValueError) as err:
                say(f"could not delete storage snapshot {data.get('name')}: {err}")
    return count


def sweep_lun_leftovers(backing_dir: Path, iqns: list[str]) -> list[str]:
    """Remove what is left of storage snapshots once their repositories are gone.

    tgt targets ``<iqn>:<snapshot>`` presenting snapshots of the section's LUNs and
    clones in ``.rdmb-snapshots`` beside their backing files. Returns what was found
    (empty when the library and :func:`drop_storage_snapshots` left nothing).
    """
    found: list[str] = []
    try:
        targets = tgt.show_targets() if iqns else []
    except RdmBackupError as err:
        say(f"cannot list tgt targets to remove leftovers: {err}")
        targets = []
    for target in targets:
        if any(target.iqn.startswith(f"{iqn}:") for iqn in iqns):
            found.append(f"tgt target {target.iqn}")
            subprocess.run(["tgtadm", "--lld", "iscsi", "--op", "delete", "--mode", "target",
                            "--tid", str(target.tid), "--force"],
                           capture_output=True, check=False)
    clones = backing_dir / SNAPSHOT_DIR
    if clones.exists():
        found += [f"snapshot file {clones / entry}" for entry in sorted(os.listdir(clones))]
        shutil.rmtree(clones)
    if found:
        say(f"lun: removed leftovers: {', '.join(found)}")
    return found


def lun_pause_window(lab: Lab, name: str) -> dict[str, Any]:
    """``--repeat`` full backups of every disk (both LUNs and vdb): how long the guest is held."""
    args = lab.args
    repo = lab.work / "rdmb-lun-window-repo"
    paused: list[float] = []
    methods: list[str] = []
    seconds: list[float] = []
    disks: dict[str, dict[str, str | None]] = {}
    try:
        for round_no in range(args.repeat):
            settle(args)
            taken, result = timed_api_backup(name, repo, None, "full")
            window = result.manifest.consistency
            paused.append(float(window["paused_ms"]))  # type: ignore[arg-type]
            methods.append(str(window["method"]))
            seconds.append(taken)
            disks = disk_paths(result)
            say(f"lun window round {round_no + 1}/{args.repeat}: full backup of "
                f"{', '.join(disks)} in {taken:.2f} s, guest held {paused[-1]:.1f} ms "
                f"({methods[-1]})")
    finally:
        drop_storage_snapshots(repo)
        remove_tree(repo)
    return {
        "lun_paused_ms": round(median(paused), 1),
        "lun_paused_method": methods[-1] if len(set(methods)) == 1
        else ",".join(sorted(set(methods))),
        "lun_window_backup_s": round(median(seconds), 3),
        "lun_window_disks": disks,
        "lun_window_runs": {"paused_ms": [round(v, 1) for v in paused],
                            "backup_s": [round(v, 3) for v in seconds]},
    }


LOADED_WINDOWS = 20  # backups whose windows are measured while a dd loads the storage


@contextmanager
def dd_load(path: Path, size: int) -> Iterator[str]:
    """A ``dd`` rewriting ``path`` in a loop, 16 MiB every quarter second or so (buffered:
    dirty pages pile up as fast as a busy guest's would); its description."""
    count = min(16, max(1, size // MiB))  # MiB per dd, within the LUN
    chunks = max(1, size // (count * MiB))
    command = (f"i=0; while :; do dd if=/dev/zero of={path} bs=1M count={count} "
               f"seek=$(( (i % {chunks}) * {count} )) conv=notrunc status=none; "
               "i=$((i+1)); sleep 0.25; done")
    proc = subprocess.Popen(["sh", "-c", command], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield (f"dd if=/dev/zero of={path.name} bs=1M count={count} conv=notrunc "
               "(buffered), then sleep 0.25, in a loop")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the loop and its dd: a group of our own
        proc.wait()


def lun_loaded_windows(lab: Lab, name: str, load_file: Path) -> dict[str, Any]:
    """``--windows`` (:data:`LOADED_WINDOWS`) backups of every disk (``auto``: a full, then
    incrementals) while a ``dd`` keeps rewriting ``load_file``, a LUN's backing file: how long
    the guest is held when the storage has writeback to do (p50 and worst; goal worst <= 100
    ms)."""
    repo = lab.work / "rdmb-lun-loaded-repo"
    paused: list[float] = []
    try:
        with dd_load(load_file, lab.size) as load:
            time.sleep(1)  # let dirty pages pile up
            for round_no in range(lab.args.windows):
                _taken, result = timed_api_backup(name, repo, None, "auto")
                paused.append(float(result.manifest.consistency["paused_ms"]))  # type: ignore[arg-type]
                say(f"lun loaded window {round_no + 1}/{lab.args.windows}: guest held "
                    f"{paused[-1]:.1f} ms")
    finally:
        drop_storage_snapshots(repo)
        remove_tree(repo)
    return {
        "lun_loaded_paused_p50_ms": round(statistics.median(paused), 1),
        "lun_loaded_paused_worst_ms": round(max(paused), 1),
        "lun_loaded_runs_ms": [round(v, 1) for v in paused],
        "lun_loaded_load": load,
    }


LUN_METHODS = ("lun_full_s", "qemu_img_convert_raw_s", "qemu_img_convert_qcow2_s")


def lun_full_and_incremental(lab: Lab, name: str, dom: libvirt.virDomain,
                             lun: IscsiLun) -> dict[str, Any]:
    """Full backup of sda vs qemu-img convert of it (rotated), then 1% rewritten, incremental."""
    args = lab.args
    disk = LUNS[0]
    url = lun.url
    runs: dict[str, list[float]] = {key: [] for key in (*LUN_METHODS, "lun_inc_s")}
    stored: dict[str, list[float]] = {key: [] for key in (*LUN_METHODS, "lun_inc_s")}
    inc_manifest: list[float] = []
    inc_transferred: list[float] = []
    verified: dict[str, bool] = {}
    full_disks: dict[str, dict[str, str | None]] = {}
    inc_disks: dict[str, dict[str, str | None]] = {}
    dirty = writes = 0
    for round_no in range(args.repeat):
        repo = lab.work / f"rdmb-lun-repo-{round_no}"
        try:
            shift = round_no % len(LUN_METHODS)
            for key in LUN_METHODS[shift:] + LUN_METHODS[:shift]:
                if key == "lun_full_s":
                    settle(args)
                    seconds, full = timed_api_backup(name, repo, [disk], "full")
                    full_disks = disk_paths(full)
                    image, fmt = Path(full.path) / full.manifest.disks[0].data_file, "qcow2"
                    stored[key].append(float(allocated_bytes(Path(full.path))))
                    label = f"rdm-backup full of {disk}"
                else:
                    fmt = "raw" if key == "qemu_img_convert_raw_s" else "qcow2"
                    image = lab.work / f"rdmb-lun-convert-{round_no}.{fmt}"
                    label = f"qemu-img convert -O {fmt}"
                    try:
                        settle(args)
                        seconds = run_convert(url, image, fmt)
                        stored[key].append(float(allocated_bytes(image)))
                        if round_no == 0 and not args.no_verify:
                            verified[key] = same_content(url, image, fmt)
                    finally:
                        remove_tree(image)
                runs[key].append(seconds)
                say(f"lun round {round_no + 1}/{args.repeat}: {label}: {seconds:.2f} s")
                if key == "lun_full_s" and round_no == 0 and not args.no_verify:
                    verified[key] = same_content(url, image, fmt)
            offsets = dirty_offsets(lab.size, args.dirty,
                                    f"rdmb-dirty-lun-{args.seed}-{round_no}")
            dirty, writes = rewrite(dom, offsets, 0x50 + round_no, disk), len(offsets)
            settle(args)
            seconds, inc = timed_api_backup(name, repo, [disk], "incremental")
            inc_disks = disk_paths(inc)
            record = inc.manifest.disks[0]
            runs["lun_inc_s"].append(seconds)
            stored["lun_inc_s"].append(float(allocated_bytes(Path(inc.path))))
            inc_manifest.append(float(record.stored_bytes))
            inc_transferred.append(float(record.bytes_transferred))
            say(f"lun round {round_no + 1}/{args.repeat}: {writes} x 64 KiB rewritten on "
                f"{disk}, {record.level} backup via {record.data_path} in {seconds:.3f} s, "
                f"stored {stored['lun_inc_s'][-1] / MiB:.2f} MiB")
            if record.level != "incremental" or record.data_path != "snapshot":
                say(f"lun: the incremental of {disk} was a {record.level} via "
                    f"{record.data_path}: {record.reason}")
            if round_no == 0 and not args.no_verify:
                verified["lun_inc_s"] = same_content(
                    url, Path(inc.path) / record.data_file, "qcow2")
        finally:
            drop_storage_snapshots(repo)
            remove_tree(repo)
    full_s = median(runs["lun_full_s"])
    raw_s = median(runs["qemu_img_convert_raw_s"])
    qcow2_s = median(runs["qemu_img_convert_qcow2_s"])
    inc_s = median(runs["lun_inc_s"])
    full_stored = median(stored["lun_full_s"])
    inc_stored = int(median(stored["lun_inc_s"]))
    return {
        "lun_full_s": round(full_s, 3),
        "qemu_img_convert_raw_s": round(raw_s, 3),
        "qemu_img_convert_qcow2_s": round(qcow2_s, 3),
        "lun_full_ratio_vs_convert_raw": round(full_s / raw_s, 3),
        "lun_full_ratio_vs_convert_qcow2": round(full_s / qcow2_s, 3),
        "lun_full_stored_bytes": int(full_stored),
        "qemu_img_convert_raw_stored_bytes": int(median(stored["qemu_img_convert_raw_s"])),
        "qemu_img_convert_qcow2_stored_bytes":
            int(median(stored["qemu_img_convert_qcow2_s"])),
        "lun_dirty_writes": writes,
        "lun_dirty_bytes": dirty,
        "lun_inc_s": round(inc_s, 3),
        "lun_inc_ratio_to_full": round(inc_s / full_s, 4),
        "lun_inc_stored_bytes": inc_stored,
        "lun_inc_manifest_stored_bytes": int(median(inc_manifest)),
        "lun_inc_bytes_transferred": int(median(inc_transferred)),
        "lun_inc_stored_ratio_to_dirty": round(inc_stored / dirty, 4),
        "lun_inc_stored_ratio_to_full": round(inc_stored / full_stored, 4),
        "lun_full_disks": full_disks,
        "lun_inc_disks": inc_disks,
        "lun_verified_identical": verified,
        "lun_runs_s": {key: [round(v, 3) for v in values] for key, values in runs.items()},
    }


def section_lun(lab: Lab) -> dict[str, Any]:
    """LUN SECTION: passthrough LUNs through storage snapshots (see the module docstring)."""
    args = lab.args
    leftovers: list[str] = []
    luns: dict[str, IscsiLun] = {}
    with ExitStack() as stack:
        backing = stack.enter_context(rdmb_reflink_tmpdir())
        # runs after the domain, the targets and the loop device are gone (LIFO)
        stack.callback(lambda: leftovers.extend(
            sweep_lun_leftovers(backing, [lun.iqn for lun in luns.values()])))
        data_bytes = 0
        for index, target in enumerate(LUNS):
            path = backing / f"rdmb-lun-{target}.img"
            say(f"lun: filling {path} ({args.size_mib} MiB, {args.fill:.0%} random data)")
            filled = fill_lun(path, lab.size, args.fill, args.extent_mib * MiB,
                              args.seed + index, args.sparse)
            data_bytes = data_bytes or filled  # sda's
            luns[target] = stack.enter_context(iscsi_target(path))
        block_file = lab.work / f"rdmb-lun-{LUN_BLOCK}.img"
        say(f"lun: filling {block_file} ({args.size_mib} MiB) for {LUN_BLOCK}")
        fill_lun(block_file, lab.size, args.fill, args.extent_mib * MiB,
                 args.seed + len(LUNS), args.sparse)
        loop = stack.enter_context(loop_device(block_file))
        name = unique_name("rdmb-bench-lun")
        disks = [iscsi_disk(target, luns[target].iqn, luns[target].lun, device="lun")
                 for target in LUNS] + [block_disk(LUN_BLOCK, loop)]
        say(f"lun: starting domain {name} ({domain_type()}) with "
            + ", ".join(f"{t} = {luns[t].url}" for t in LUNS) + f", {LUN_BLOCK} = {loop}")
        dom = stack.enter_context(test_domain(name, disks))
        result: dict[str, Any] = {
            "lun_domain": name,
            "lun_size_bytes": lab.size,
            "lun_data_bytes": data_bytes,
            "lun_iqns": {target: lun.iqn for target, lun in luns.items()},
            "lun_backing_dir": str(backing),
            "lun_block_device": loop,
        }
        result.update(lun_pause_window(lab, name))
        result.update(lun_full_and_incremental(lab, name, dom, luns[LUNS[0]]))
        result.update(lun_loaded_windows(lab, name, backing / f"rdmb-lun-{LUNS[1]}.img"))
    result["lun_leftovers_removed"] = leftovers
    return result


def print_table(doc: dict[str, Any], methods_order: list[tuple[str, str]]) -> None:
    lun = doc["lun_bytes"]
    where = ("loop device over a file in /var/tmp/rdmb-*" if set(doc["sections"]) - {"lun"}
             else "iSCSI LUNs over files on the reflink XFS")
    print(f"LUN: {lun / MiB:.0f} MiB {where} "
          f"({doc['data_bytes'] / MiB:.0f} MiB random data in "
          f"{doc['extent_bytes'] // MiB} MiB extents, zeros {doc['zeros']}); "
          f"domain type {doc['domain_type']}; sections: {', '.join(doc['sections'])}")
    print(f"Each measured run follows `sync; echo 3 > /proc/sys/vm/drop_caches` (page cache "
          f"dropped) and a {doc['settle_s']} s pause; medians of {doc['repeat']} round(s).")
    print()
    if "rdm_backup_s" in doc:
        print_full(doc, methods_order)
    if "nbd_push_s" in doc:
        print_nbd(doc)
    if "incremental_s" in doc:
        print_incremental(doc)
    if "virtnbdbackup_inc_s" in doc:
        print_peer(doc)
    if "resync" in doc:
        print_resync(doc)
    if "lun_paused_ms" in doc:
        print_lun(doc)
    if "guestio_direct_median_ms" in doc:
        print_guestio(doc)


def goal(doc: dict[str, Any], key: str) -> str:
    """``ratio  (goal <= G: met/missed)`` for a ratio with a goal."""
    value, wanted = doc[key], GOALS[key]
    return f"{value:.3f}   (goal <= {wanted}: {'met' if value <= wanted else 'missed'})"


def print_full(doc: dict[str, Any], methods_order: list[tuple[str, str]]) -> None:
    lun = doc["lun_bytes"]
    print("== full backup (rotated order per round)")
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


def print_nbd(doc: dict[str, Any]) -> None:
    lun = doc["lun_bytes"]
    runs = doc["nbd_runs_s"]
    print("== nbd: full backup of vdb pushed to an NBD volume (`rdm-backup receive` on "
          "127.0.0.1) vs to a file repository vs `qemu-img convert -f raw -O raw` into a "
          "plain qemu-nbd export (rotated order per round)")
    header = f"  {'method':<44} {'median s':>9} {'MiB/s':>8}  runs (s)"
    print(header)
    for key, label in (("file_target_s", "rdm-backup -> file repository (api.backup)"),
                       ("nbd_push_s", "rdm-backup -> NBD volume (api.backup)"),
                       ("qemu_img_convert_nbd_s", "qemu-img convert -> qemu-nbd export")):
        seconds = doc[key]
        rate = lun / MiB / seconds if seconds else 0.0
        print(f"  {label:<44} {seconds:>9.3f} {rate:>8.0f}  "
              f"{', '.join(f'{v:.2f}' for v in runs[key])}")
    print(f"  until the copy job ended: file repository {doc['file_target_copy_s']:.3f} s, "
          f"NBD volume {doc['nbd_push_copy_s']:.3f} s")
    print("  ratio = push time / other time (below 1: the push is faster; no goal, context)")
    print(f"    vs the file repository:              {doc['ratio_nbd_push_vs_file_target']:.3f}")
    print(f"    vs qemu-img convert into NBD:        {doc['ratio_nbd_push_vs_convert_nbd']:.3f}")
    data = doc["data_bytes"]
    print(f"  on disk (st_blocks) for {data / MiB:.0f} MiB of data: volume file "
          f"{doc['nbd_volume_stored_bytes'] / MiB:.2f} MiB (ratio to data "
          f"{doc['nbd_volume_stored_ratio_to_data']}; its apparent size "
          f"{doc['nbd_volume_size_bytes'] / MiB:.0f} MiB, sparse), file repository's backup "
          f"{doc['file_target_stored_bytes'] / MiB:.2f} MiB "
          f"({doc['file_target_stored_ratio_to_data']}), convert's raw file "
          f"{doc['qemu_img_convert_nbd_stored_bytes'] / MiB:.2f} MiB "
          f"({doc['qemu_img_convert_nbd_stored_ratio_to_data']})")
    print(f"  push manifest: stored {doc['nbd_push_manifest_stored_bytes'] / MiB:.2f} MiB, "
          f"copied {doc['nbd_push_bytes_transferred'] / MiB:.2f} MiB")
    if doc["nbd_verified_identical"]:
        checks = ", ".join(f"{k.removesuffix('_s')}={'identical' if v else 'DIFFERENT'}"
                           for k, v in doc["nbd_verified_identical"].items())
        print(f"  first-round copies vs the LUN (qemu-img compare): {checks}")
    for problem in doc["nbd_server_problems"]:
        print(f"  SERVER: {problem}")
    if doc["nbd_qemu_leftovers"]:
        print(f"  LEFT IN QEMU by the backups: {', '.join(doc['nbd_qemu_leftovers'])}")
    print()


def print_incremental(doc: dict[str, Any]) -> None:
    mib = doc["dirty_bytes"] / MiB
    print(f"== incremental: {doc['dirty_writes']} guest writes of 64 KiB at scattered "
          f"64 KiB-aligned offsets ({mib:.2f} MiB, {doc['dirty_fraction']:.0%} of the LUN) "
          "between a full and an incremental backup of vdb")
    runs = doc["incremental_runs_s"]
    print(f"  full (api.backup level=full):          {doc['incremental_full_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['full'])}")
    print(f"  incremental (api.backup):              {doc['incremental_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['incremental'])}")
    print(f"  incremental (rdm-backup command):      {doc['incremental_cli_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['incremental_cli'])}")
    print(f"  incremental time / full time:          {goal(doc, 'incremental_ratio_to_full')}")
    print(f"  stored by the incremental:             "
          f"{doc['incremental_stored_bytes'] / MiB:8.3f} MiB on disk (manifest: "
          f"{doc['incremental_manifest_stored_bytes'] / MiB:.3f} MiB, copied "
          f"{doc['incremental_bytes_transferred'] / MiB:.3f} MiB)")
    print(f"  stored / rewritten bytes:              "
          f"{goal(doc, 'incremental_stored_ratio_to_dirty')}")
    check = doc["incremental_verified_identical"]
    if check is not None:
        print(f"  first-round chain (full + incremental) vs the LUN: "
              f"{'identical' if check else 'DIFFERENT'}")
    print()


def print_peer(doc: dict[str, Any]) -> None:
    print(f"== peer: virtnbdbackup {doc['peer']} on a qcow2 disk with the same data "
          f"(zeros unallocated) in domain {doc['peer_domain']}, the same rewrites; "
          "whole commands")
    runs = doc["virtnbdbackup_runs_s"]
    print(f"  virtnbdbackup -l full:                 {doc['virtnbdbackup_full_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['full'])}   stored "
          f"{doc['virtnbdbackup_full_stored_bytes'] / MiB:.2f} MiB")
    print(f"  virtnbdbackup -l inc:                  {doc['virtnbdbackup_inc_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['inc'])}   stored "
          f"{doc['virtnbdbackup_inc_stored_bytes'] / MiB:.2f} MiB")
    if "ratio_inc_vs_virtnbdbackup_inc" in doc:
        print(f"  our raw-LUN incremental / its qcow2 incremental: "
              f"{goal(doc, 'ratio_inc_vs_virtnbdbackup_inc')}")
        print(f"    the same with our command (a whole process too): "
              f"{doc['ratio_inc_cli_vs_virtnbdbackup_inc']:.3f}")
        print(f"  our full (all of the LUN read) / its full (allocated qcow2 data): "
              f"{doc['ratio_full_vs_virtnbdbackup_full']:.3f}   (context)")
    print()


def print_resync(doc: dict[str, Any]) -> None:
    if doc["resync"] != "measured":
        print(f"== resync: {doc['resync']}")
        print()
        return
    print(f"== resync after a domain restart, {doc['resync_dirty_bytes'] / MiB:.2f} MiB "
          f"rewritten (level reported: {doc['resync_level']})")
    print(f"  full {doc['resync_full_s']:.3f} s, resync {doc['resync_s']:.3f} s: "
          f"ratio {doc['resync_ratio_to_full']:.3f}")
    print(f"  stored {doc['resync_stored_bytes'] / MiB:.3f} MiB: ratio to rewritten bytes "
          f"{doc['resync_stored_ratio_to_dirty']:.3f}")
    check = doc["resync_verified_identical"]
    if check is not None:
        print(f"  first-round chain (full + resync) vs the LUN: "
              f"{'identical' if check else 'DIFFERENT'}")
    print()


def _paths(disks: dict[str, dict[str, str | None]]) -> str:
    """``sda snapshot/full (tgt-reflink), vdb qemu/full`` from :func:`disk_paths`."""
    return ", ".join(f"{target} {d['data_path']}/{d['level']}"
                     + (f" ({d['agent']})" if d.get("agent") else "")
                     for target, d in disks.items())


def print_lun(doc: dict[str, Any]) -> None:
    size = doc["lun_size_bytes"]
    runs = doc["lun_runs_s"]
    print(f"== lun: two {size / MiB:.0f} MiB iSCSI LUNs (device='lun' on virtio-scsi, backing "
          f"files on the reflink XFS) and a {size / MiB:.0f} MiB loop device ({LUN_BLOCK}, "
          f"block layer) in domain {doc['lun_domain']}")
    window = doc["lun_window_runs"]
    print(f"  guest held during a full backup of all three, ms ({doc['lun_paused_method']}): "
          f"{goal(doc, 'lun_paused_ms')}   runs "
          f"{', '.join(f'{v:.1f}' for v in window['paused_ms'])}")
    print(f"    those backups took {doc['lun_window_backup_s']:.3f} s; "
          f"{_paths(doc['lun_window_disks'])}")
    print(f"  guest held with a dd loading the storage ({doc['lun_loaded_load']}), "
          f"{len(doc['lun_loaded_runs_ms'])} backups, ms: p50 "
          f"{doc['lun_loaded_paused_p50_ms']:.1f}, worst {goal(doc, 'lun_loaded_paused_worst_ms')}")
    print(f"    runs {', '.join(f'{v:.1f}' for v in doc['lun_loaded_runs_ms'])}")
    header = f"  {'full copy of sda':<40} {'median s':>9} {'MiB/s':>8}  runs (s)"
    print(header)
    for key, label in (("lun_full_s", "rdm-backup (api.backup, sda only)"),
                       ("qemu_img_convert_raw_s", "qemu-img convert -f raw -O raw"),
                       ("qemu_img_convert_qcow2_s", "qemu-img convert -f raw -O qcow2")):
        seconds = doc[key]
        rate = size / MiB / seconds if seconds else 0.0
        print(f"  {label:<40} {seconds:>9.3f} {rate:>8.0f}  "
              f"{', '.join(f'{v:.2f}' for v in runs[key])}")
    print(f"  ratio = rdm-backup time / convert time (below 1: rdm-backup is faster); "
          f"{_paths(doc['lun_full_disks'])}")
    print(f"    vs convert -O raw:                   {goal(doc, 'lun_full_ratio_vs_convert_raw')}")
    print(f"    vs convert -O qcow2:                 "
          f"{goal(doc, 'lun_full_ratio_vs_convert_qcow2')}")
    print(f"  stored: rdm-backup {doc['lun_full_stored_bytes'] / MiB:.2f} MiB, convert raw "
          f"{doc['qemu_img_convert_raw_stored_bytes'] / MiB:.2f} MiB, qcow2 "
          f"{doc['qemu_img_convert_qcow2_stored_bytes'] / MiB:.2f} MiB")
    print(f"  incremental after {doc['lun_dirty_writes']} guest writes of 64 KiB on sda "
          f"({doc['lun_dirty_bytes'] / MiB:.2f} MiB): {doc['lun_inc_s']:.3f} s   runs "
          f"{', '.join(f'{v:.3f}' for v in runs['lun_inc_s'])}; {_paths(doc['lun_inc_disks'])}")
    print(f"    incremental time / full time:        {goal(doc, 'lun_inc_ratio_to_full')}")
    print(f"    stored {doc['lun_inc_stored_bytes'] / MiB:.3f} MiB on disk (manifest: "
          f"{doc['lun_inc_manifest_stored_bytes'] / MiB:.3f} MiB, copied "
          f"{doc['lun_inc_bytes_transferred'] / MiB:.3f} MiB); / full's: "
          f"{doc['lun_inc_stored_ratio_to_full']:.4f}")
    print(f"    stored / rewritten bytes:            "
          f"{goal(doc, 'lun_inc_stored_ratio_to_dirty')}")
    if doc["lun_verified_identical"]:
        checks = ", ".join(f"{k.removesuffix('_s')}={'identical' if v else 'DIFFERENT'}"
                           for k, v in doc["lun_verified_identical"].items())
        print(f"  first-round copies vs the LUN (qemu-img compare): {checks}")
    if doc["lun_leftovers_removed"]:
        print(f"  LEFT BEHIND by the backups (removed by the bench): "
              f"{', '.join(doc['lun_leftovers_removed'])}")
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="bench: %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, drop_caches, qemu:///system)", file=sys.stderr)
        return 2
    if "peer" in args.sections and shutil.which("virtnbdbackup") is None:
        print("bench: the peer section needs virtnbdbackup (apt-get install virtnbdbackup, "
              "or make install); choose other --sections to run without it", file=sys.stderr)
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
