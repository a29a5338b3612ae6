"""What the bench's sections share: constants, goals, the lab handle, preparation, timing."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from libvirt_rdm_backup import api
from tools.labkit import guest_write

MiB = 1024 * 1024
KiB = 1024
GiB = 1024 * MiB
DISK = "vdb"
WRITE = 64 * KiB  # size and alignment of each simulated guest write
# Goals printed beside the measured ratios, never asserted: a value at most the goal
# meets it, for the keys in AT_LEAST one at least the goal does.
GOALS = {
    # nbd: pushing a full backup to an NBD volume costs at most 30% over a file repository
    "ratio_nbd_push_vs_file_target": 1.3,
    # incremental: 1% rewritten costs at most 5% of a full, stores about what was rewritten;
    # the command (a whole process) at most 30% over the same through the Python API
    "incremental_ratio_to_full": 0.05,
    "incremental_stored_ratio_to_dirty": 1.2,
    "ratio_inc_cli_vs_api": 1.3,
    "ratio_inc_vs_virtnbdbackup_inc": 1.0,
    # restore: at least 90% of dd's throughput writing the same data to the same kind of device
    "restore_throughput_ratio_vs_dd": 0.9,
    # lun section: the guest held at most 100 ms; a full backup of a LUN from a storage
    # snapshot at least as fast as a bare qemu-img convert of it; the incremental as above
    "lun_paused_ms": 100.0,
    "lun_loaded_paused_worst_ms": 100.0,
    "lun_full_ratio_vs_convert_raw": 1.0,
    "lun_full_ratio_vs_convert_qcow2": 1.1,
    "lun_inc_ratio_to_full": 0.05,
    "lun_inc_stored_ratio_to_dirty": 1.2,
    # rss: the tool's peak resident memory on a large sparse LUN, MiB
    "rss_max_mib": 100.0,
    # rbd: an RBD disk's incremental (1% rewritten, from RBD snapshots) at most 5% of its full
    "rbd_inc_ratio_to_full": 0.05,
    "rbd_inc_stored_ratio_to_dirty": 1.2,
    # prune: the bytes a merge copies, at most 10% over those that must move
    "prune_moved_ratio": 1.1,
    # live: the guest reads its backup point from its disk within 10 s of the command (any
    # LUN size), and the copy back to the LUN runs at least at 80% of dd's throughput
    "live_guest_reads_s": 10.0,
    "live_copy_throughput_ratio_vs_dd": 0.8,
    # atrest: an encrypted full backup at most 30% slower than a plain one
    "atrest_encrypted_ratio_to_plain": 1.3,
}
AT_LEAST = frozenset({"restore_throughput_ratio_vs_dd", "live_copy_throughput_ratio_vs_dd"})


def say(message: str) -> None:
    """Progress on stderr (stdout carries the table and the JSON)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- preparation -----------------------------------------------------------------


def data_extents(size: int, fill: float, extent: int, seed: int) -> list[int]:
    """Indexes of the extents :func:`fill_lun` fills with random data (never the first)."""
    count = size // extent
    wanted = min(count - 1, round(fill * size / extent))
    return random.Random(seed).sample(range(1, count), wanted) if wanted > 0 else []


def fill_lun(path: Path, size: int, fill: float, extent: int, seed: int, sparse: bool) -> int:
    """Write the LUN's backing file: random extents at scattered places, zeros elsewhere.

    Zeros are written as real blocks (as on an array LUN) unless ``sparse``. The first
    extent stays zero so that the firmware finds no boot sector. Returns the data bytes.
    """
    count = size // extent
    chosen = set(data_extents(size, fill, extent, seed))
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


@dataclass
class Run:
    """One measured operation: its time and the copy it made."""

    seconds: float
    image: Path
    extra: dict[str, float] = field(default_factory=dict)


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


def dirty_offsets(size: int, fraction: float, seed: str) -> list[int]:
    """Distinct 64 KiB-aligned offsets, in random order, covering ``fraction`` of the disk.

    The first 64 KiB are left alone (no boot sector appears for the firmware).
    """
    slots = size // WRITE
    count = max(1, min(slots - 1, round(fraction * size / WRITE)))
    return [slot * WRITE for slot in random.Random(seed).sample(range(1, slots), count)]




@dataclass
class Taken:
    """One backup taken through the API, timed as the whole call."""

    seconds: float
    level: str
    stored_bytes: int  # what the backup's directory takes on disk (st_blocks)
    manifest_stored_bytes: int
    bytes_transferred: int
    image: Path


def timed_backup(domain: str, repo: Path, level: str, disk: str = DISK) -> Taken:
    """:func:`api.backup` of ``disk`` (vdb) at ``level``; the level it reports is checked."""
    started = time.monotonic()
    result = api.backup(domain, str(repo), disks=[disk], level=level)
    seconds = time.monotonic() - started
    record = result.manifest.disks[0]
    if level != "auto" and record.level != level:
        raise RuntimeError(f"asked for a {level} backup, got {record.level}: {record.reason}")
    backup_dir = Path(result.path)
    return Taken(seconds, record.level, allocated_bytes(backup_dir), record.stored_bytes,
                 record.bytes_transferred, backup_dir / record.data_file)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


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


def goal_met(key: str, value: float) -> bool:
    """Whether a measured value meets its goal (:data:`GOALS`, :data:`AT_LEAST`)."""
    return value >= GOALS[key] if key in AT_LEAST else value <= GOALS[key]


def goal(doc: dict[str, Any], key: str) -> str:
    """``ratio  (goal <= G: met/missed)`` for a ratio with a goal."""
    value, wanted = doc[key], GOALS[key]
    sign = ">=" if key in AT_LEAST else "<="
    return f"{value:.3f}   (goal {sign} {wanted}: {'met' if goal_met(key, value) else 'missed'})"


def rewrite(dom: libvirt.virDomain, offsets: list[int], pattern: int, disk: str = DISK) -> int:
    """Guest-side writes of 64 KiB at each offset (one HMP ``qemu-io`` each); the bytes."""
    for offset in offsets:
        guest_write(dom, disk, pattern, offset, WRITE)
    return len(offsets) * WRITE


def print_timings(title: str, rows: tuple[tuple[str, str], ...], doc: dict[str, Any],
                  runs: dict[str, list[float]], size: int, width: int) -> None:
    """A table of timed methods: median seconds, MiB/s of ``size`` bytes, and each run."""
    print(f"  {title:<{width}} {'median s':>9} {'MiB/s':>8}  runs (s)")
    for key, label in rows:
        seconds = doc[key]
        rate = size / MiB / seconds if seconds else 0.0
        print(f"  {label:<{width}} {seconds:>9.3f} {rate:>8.0f}  "
              f"{', '.join(f'{v:.2f}' for v in runs[key])}")


def print_verified(doc: dict[str, Any], key: str, what: str) -> None:
    """The line saying whether the first round's copy matched the LUN (when it was checked)."""
    check = doc[key]
    if check is not None:
        print(f"  first-round {what} vs the LUN: {'identical' if check else 'DIFFERENT'}")
