"""Section ``rss``: the tool's peak resident memory on a large sparse LUN.

A sparse file of ``--rss-size-gib`` (64 GiB by default) holding ``RSS_DATA`` of random data
in scattered 1 MiB extents, the rest holes, becomes a loop device, ``vdb`` of a firmware-only
domain of its own. Then, each a whole ``rdm-backup`` process whose peak RSS is read from
its ``VmHWM`` (/proc/PID/status, polled while it runs; QEMU and ``qemu-img`` are other
processes, not counted):
``backup --level full``, ``RSS_WRITES`` guest writes of 64 KiB, ``backup --level
incremental``, and ``restore`` of the newest backup into a new (sparse) file. Reported: each
peak and their maximum (goal <= 100 MiB), and how long each took.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tools.bench.common import (
    DISK,
    GiB,
    Lab,
    MiB,
    dirty_offsets,
    fill_lun,
    goal,
    remove_tree,
    rewrite,
    say,
)
from tools.labkit import block_disk, loop_device, rdm_backup_argv, test_domain, unique_name

RSS_DATA = 64 * MiB  # random data in the sparse LUN
RSS_WRITES = 16  # guest writes of 64 KiB before the incremental
RSS_STEPS = ("backup_full", "backup_incremental", "restore")
POLL = 0.01  # seconds between reads of the command's VmHWM


def vm_hwm(pid: int) -> int | None:
    """The peak resident memory of a live process, bytes (``VmHWM`` of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss(argv: list[str], log: Path) -> tuple[float, int, dict[str, Any]]:
    """Run one command; (seconds, peak RSS in bytes of that process alone, its JSON output).

    The peak is the process's own ``VmHWM`` (reset by its exec), read every ``POLL``
    seconds while it runs. Not ``ru_maxrss`` from ``wait4``: that also counts the pages of
    the forking bench process the child shared before its exec, and the children it waited
    for (``qemu-img``).
    """
    out = log.with_suffix(".out")
    peak = 0
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid) or 0)
            time.sleep(POLL)
        seconds = time.monotonic() - started
    try:
        if proc.returncode != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(argv[-8:])} exited {proc.returncode}: {tail}")
        text = out.read_text().strip()
        reported = json.loads(text) if text else {}
    finally:
        remove_tree(out)
        remove_tree(log)
    return seconds, peak, reported


def section_rss(lab: Lab) -> dict[str, Any]:
    """The three commands on the sparse LUN (see the module)."""
    args = lab.args
    size = args.rss_size_gib * GiB
    seconds: dict[str, float] = {}
    rss: dict[str, int] = {}
    with ExitStack() as stack:
        path = lab.work / "rdmb-rss-lun.img"
        stack.callback(remove_tree, path)
        say(f"rss: {path}: {args.rss_size_gib} GiB sparse, {RSS_DATA // MiB} MiB random data")
        data = fill_lun(path, size, RSS_DATA / size, MiB, args.seed, sparse=True)
        device = stack.enter_context(loop_device(path))
        name = unique_name("rdmb-bench-rss")
        dom = stack.enter_context(test_domain(name, [block_disk(DISK, device)]))
        repo = lab.work / "rdmb-rss-repo"
        stack.callback(remove_tree, repo)
        restored = lab.work / "rdmb-rss-restored.img"
        stack.callback(remove_tree, restored)
        cli = [*rdm_backup_argv(), "--json"]
        for step in RSS_STEPS:
            if step == "backup_incremental":
                rewrite(dom, dirty_offsets(size, RSS_WRITES * 64 * 1024 / size,
                                           f"rdmb-rss-{args.seed}"), 0x71)
            if step == "restore":
                argv = [*cli, "restore", name, "--target", str(repo), "--disk", DISK,
                        "--to", str(restored)]
            else:
                level = step.removeprefix("backup_")
                argv = [*cli, "backup", name, "--target", str(repo), "--disk", DISK,
                        "--level", level]
            took, peak, reported = peak_rss(argv, lab.work / f"rdmb-rss-{step}.log")
            if step != "restore" and reported.get("level") != step.removeprefix("backup_"):
                raise RuntimeError(f"rss: {step} made a {reported.get('level')} backup")
            seconds[step], rss[step] = took, peak
            say(f"rss: {step}: {took:.2f} s, peak RSS {peak / MiB:.1f} MiB")
    return {
        "rss_lun_bytes": size,
        "rss_data_bytes": data,
        "rss_domain": name,
        "rss_peak_mib": {step: round(value / MiB, 1) for step, value in rss.items()},
        "rss_s": {step: round(value, 3) for step, value in seconds.items()},
        "rss_max_mib": round(max(rss.values()) / MiB, 1),
    }


def print_rss(doc: dict[str, Any]) -> None:
    print(f"== rss: the rdm-backup command on a {doc['rss_lun_bytes'] / GiB:.0f} GiB sparse LUN "
          f"({doc['rss_data_bytes'] / MiB:.0f} MiB data), peak RSS of its process (VmHWM)")
    for step in RSS_STEPS:
        print(f"  {step:<22} {doc['rss_peak_mib'][step]:8.1f} MiB   {doc['rss_s'][step]:8.2f} s")
    print(f"  max:                   {goal(doc, 'rss_max_mib')}")
    print()
