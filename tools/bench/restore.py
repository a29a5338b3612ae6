"""Section ``restore``: :func:`api.restore` of vdb onto a block device against ``dd`` writing
the same data to the same kind of device.

One full backup of vdb (not measured) into a repository. Then ``--repeat`` rounds in a
rotated order, each onto a fresh sparse file of the LUN's size attached as a loop device
(nothing on it yet, as on a replacement LUN) and measured after the page-cache drop:

- ``restore_s``: :func:`api.restore` of that backup's vdb to the loop device (the whole
  call: the chain checked, the device's non-zero ranges zeroed, ``qemu-img convert``, fsync);
- ``restore_dd_s``: ``dd if=/dev/loopX of=/dev/loopY bs=4M iflag=direct oflag=direct
  conv=fsync`` from vdb's own loop device (the same bytes, on disk when dd exits).

Reported: throughput of each (the LUN's size / time) and restore / dd (goal >= 0.9).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from libvirt_rdm_backup import api
from tools.bench.common import (
    DISK,
    Lab,
    MiB,
    goal,
    median,
    remove_tree,
    same_content,
    say,
    settle,
)
from tools.labkit import loop_device

RESTORE_METHODS = ("restore_s", "restore_dd_s")


def run_restore(lab: Lab, repo: Path, device: str) -> float:
    """:func:`api.restore` of vdb's newest backup onto ``device``, timed as the whole call."""
    started = time.monotonic()
    api.restore(lab.name, str(repo), DISK, device)
    return time.monotonic() - started


def run_dd_copy(source: str, device: str) -> float:
    """dd of ``source`` onto ``device``: direct I/O, fsync before it exits."""
    argv = ["dd", f"if={source}", f"of={device}", "bs=4M", "iflag=direct", "oflag=direct",
            "conv=fsync", "status=none"]
    started = time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - started


def section_restore(lab: Lab) -> dict[str, Any]:
    """Restore vs dd onto fresh loop devices (see the module)."""
    args = lab.args
    repo = lab.work / "rdmb-restore-repo"
    runs: dict[str, list[float]] = {key: [] for key in RESTORE_METHODS}
    verified: dict[str, bool] = {}
    try:
        api.backup(lab.name, str(repo), disks=[DISK], level="full")
        for round_no in range(args.repeat):
            shift = round_no % len(RESTORE_METHODS)
            for key in RESTORE_METHODS[shift:] + RESTORE_METHODS[:shift]:
                target = lab.work / f"rdmb-restore-target-{round_no}-{key}.img"
                try:
                    with open(target, "wb") as stream:
                        stream.truncate(lab.size)
                    with loop_device(target) as device:
                        settle(args)
                        if key == "restore_s":
                            seconds = run_restore(lab, repo, device)
                        else:
                            seconds = run_dd_copy(lab.device, device)
                        if round_no == 0 and not args.no_verify:
                            verified[key] = same_content(lab.device, device, "raw")
                finally:
                    remove_tree(target)
                runs[key].append(seconds)
                say(f"restore round {round_no + 1}/{args.repeat}: "
                    f"{'api.restore' if key == 'restore_s' else 'dd'}: {seconds:.2f} s")
    finally:
        remove_tree(repo)
    restore_s, dd_s = median(runs["restore_s"]), median(runs["restore_dd_s"])
    return {
        "restore_s": round(restore_s, 3),
        "restore_dd_s": round(dd_s, 3),
        "restore_mib_s": round(lab.size / MiB / restore_s, 1),
        "restore_dd_mib_s": round(lab.size / MiB / dd_s, 1),
        "restore_throughput_ratio_vs_dd": round(dd_s / restore_s, 3),
        "restore_verified_identical": verified,
        "restore_runs_s": {key: [round(v, 3) for v in values] for key, values in runs.items()},
    }


def print_restore(doc: dict[str, Any]) -> None:
    runs = doc["restore_runs_s"]
    print("== restore: vdb's full backup onto a fresh loop device vs dd of vdb onto one "
          "(rotated order per round)")
    print(f"  api.restore:                                    {doc['restore_s']:8.3f} s "
          f"{doc['restore_mib_s']:8.0f} MiB/s   runs "
          f"{', '.join(f'{v:.2f}' for v in runs['restore_s'])}")
    print(f"  dd bs=4M iflag=direct oflag=direct conv=fsync:  {doc['restore_dd_s']:8.3f} s "
          f"{doc['restore_dd_mib_s']:8.0f} MiB/s   runs "
          f"{', '.join(f'{v:.2f}' for v in runs['restore_dd_s'])}")
    print(f"  restore throughput / dd throughput:             "
          f"{goal(doc, 'restore_throughput_ratio_vs_dd')}")
    if doc["restore_verified_identical"]:
        checks = ", ".join(f"{k.removesuffix('_s')}={'identical' if v else 'DIFFERENT'}"
                           for k, v in doc["restore_verified_identical"].items())
        print(f"  first-round devices vs the LUN (qemu-img compare): {checks}")
    print()
