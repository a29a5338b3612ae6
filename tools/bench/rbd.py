"""Section ``rbd``: an RBD disk backed up through RBD snapshots, against a loop LUN of the same
size and data backed up through QEMU's dirty bitmap.

The goal (an incremental with 1% rewritten at most 0.05 of its full) is measured on a fully
written disk: a file of ``--size-mib`` of random data (only its first sector zero, so that
the firmware finds no boot sector) becomes a loop device (``vdb``, ``<disk type='block'
device='disk'>``) and is copied into a thin RBD image of the lab's cluster (``vdc``,
``<disk type='network'>`` through the lab's cephx secret), both disks of one firmware-only
domain: the full copies the whole disk, and ``--dirty`` (1%) of the disk is 1% of what the
full copied. ``--repeat`` rounds, each in fresh repositories and each measurement after the
page-cache drop: a full backup of vdc, a full of vdb, ``--dirty`` of both rewritten by the
guest side at the same offsets (HMP ``qemu-io``, 64 KiB writes), an incremental of vdc (the
extents ``diff_iterate`` reports between the two RBD snapshots) and one of vdb (QEMU's
bitmap). Reported: RBD incremental time / RBD full time (goal <= 0.05), RBD incremental time
/ loop incremental time (context), the bytes each incremental copied and stored, and (context)
the time the cluster takes to create one snapshot of the image in use, which every RBD
incremental waits for (its monitor commits the new snapshot id).

Then, as context, the bench's sparse layout: an RBD image holding ``--fill`` of random data
(as the other sections' LUN), alone in a domain, with the same rounds of full and
incremental; its incremental / full ratio (no goal: the full copies only ``--fill`` of the
disk, so 1% of the disk is 4% of the full's data at the default 25%) and bytes.

The first round's RBD chain of each layout is compared with the image (``qemu-img
compare``). Each image, with the snapshots the chains keep, is removed when its layout is
done, also on failure, and so are the files the layouts were written from. The cluster must
have room for the larger image (checked first; the lab's OSD is a 16 GiB sparse file).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tools import cephkit
from tools.bench.common import (
    Lab,
    MiB,
    Taken,
    dirty_offsets,
    fill_lun,
    goal,
    median,
    print_verified,
    remove_tree,
    rewrite,
    same_content,
    say,
    settle,
    timed_backup,
)
from tools.labkit import DiskSpec, block_disk, loop_device, test_domain, unique_name

LOOP, RBD = "vdb", "vdc"
SNAPSHOTS_TIMED = 5
ROOM = 1.2  # cluster room needed, times the image size (snapshots keep the rewritten objects)


def fill_whole(path: Path, size: int, extent: int) -> int:
    """Write random data over the whole file but its first sector; returns the data bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, extent):
            piece = bytearray(os.urandom(min(extent, size - offset)))
            if offset == 0:
                piece[:512] = bytes(512)
            os.pwrite(fd, piece, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _round(lab: Lab, name: str, round_no: int, image: cephkit.RbdImage, disks: tuple[str, ...],
           layout: str) -> dict[str, Any]:
    """One round: fulls, the same rewrites on each disk, incrementals."""
    args = lab.args
    assert lab.dom is not None
    repos = {disk: lab.work / f"rdmb-rbd-{layout}-{disk}-{round_no}" for disk in disks}
    taken: dict[str, Taken] = {}
    try:
        for disk in disks:
            settle(args)
            taken[f"{disk}_full"] = timed_backup(name, repos[disk], "full", disk)
        offsets = dirty_offsets(lab.size, args.dirty,
                                f"rdmb-rbd-dirty-{layout}-{args.seed}-{round_no}")
        dirty = 0
        for disk in disks:
            dirty = rewrite(lab.dom, offsets, 0x50 + round_no, disk)
        for disk in disks:
            settle(args)
            taken[f"{disk}_inc"] = timed_backup(name, repos[disk], "incremental", disk)
        verified = None
        if round_no == 0 and not args.no_verify:
            verified = same_content(image.qemu_uri, taken[f"{RBD}_inc"].image, "qcow2")
    finally:
        for repo in repos.values():
            remove_tree(repo)
    say(f"rbd {layout} round {round_no + 1}/{args.repeat}: " + ", ".join(
        f"{key} {t.seconds:.3f} s" for key, t in taken.items()))
    return {"taken": taken, "dirty": dirty, "writes": len(offsets), "verified": verified}


def _layout(lab: Lab, layout: str, with_loop: bool) -> tuple[int, list[dict[str, Any]]]:
    """The rounds on one layout (``whole``: every byte data; ``sparse``: ``--fill`` of it);
    its data bytes and rounds. The file, the image and the domain are removed afterwards."""
    args = lab.args
    lun_file = lab.work / f"rdmb-rbd-{layout}.img"
    rounds: list[dict[str, Any]] = []
    try:
        if layout == "whole":
            data = fill_whole(lun_file, lab.size, args.extent_mib * MiB)
        else:
            data = fill_lun(lun_file, lab.size, args.fill, args.extent_mib * MiB, args.seed,
                            args.sparse)
        with cephkit.rbd_image(lab.size) as image:
            say(f"rbd: copying {lun_file} into {image.spec}")
            subprocess.run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O",
                            "raw", str(lun_file), image.qemu_uri], check=True, timeout=3600)
            if with_loop:
                with loop_device(str(lun_file)) as device:
                    rounds = _rounds(lab, image, [block_disk(LOOP, device)], layout)
            else:
                lun_file.unlink()
                rounds = _rounds(lab, image, [], layout)
    finally:
        lun_file.unlink(missing_ok=True)
    return data, rounds


def snapshot_seconds(image: cephkit.RbdImage, count: int) -> list[float]:
    """``count`` snapshots of the image (in use by the domain) created through librbd, each
    timed alone (the connection and the image open before, the removal after, not counted):
    the storage's own fixed cost in every RBD incremental (the monitor commits a new
    snapshot id)."""
    import rbd

    times: list[float] = []
    with cephkit.ioctx(image.pool) as ctx, rbd.Image(ctx, image.name) as opened:
        for n in range(count):
            name = unique_name(f"rdmb-bench-snap{n}")
            started = time.monotonic()
            opened.create_snap(name)
            times.append(time.monotonic() - started)
            opened.remove_snap(name)
            time.sleep(0.5)
    return times


def _rounds(lab: Lab, image: cephkit.RbdImage, others: list[DiskSpec],
            layout: str) -> list[dict[str, Any]]:
    name = unique_name("rdmb-bench-rbd")
    disks = (RBD, LOOP) if others else (RBD,)
    with test_domain(name, [*others, cephkit.rbd_disk(RBD, image)]) as dom:
        shared = lab.dom, lab.name  # the shared LUN's domain, for the sections after this
        lab.dom, lab.name = dom, name
        try:
            rounds = [_round(lab, name, n, image, disks, layout) for n in range(lab.args.repeat)]
            rounds[0]["snapshots"] = snapshot_seconds(image, SNAPSHOTS_TIMED)
            return rounds
        finally:
            lab.dom, lab.name = shared


def section_rbd(lab: Lab) -> dict[str, Any]:
    """Full and incremental of a fully written RBD disk and of a loop LUN with the same data,
    then of an RBD disk in the bench's sparse layout."""
    why = cephkit.unavailable()
    if why is None and cephkit.free_bytes() < ROOM * lab.size:
        why = (f"the cluster has {cephkit.free_bytes() / MiB:.0f} MiB free, the section needs "
               f"{ROOM * lab.size / MiB:.0f} MiB")
    if why is not None:
        say(f"rbd: not measured: {why}")
        return {"rbd_not_measured": why}
    data, rounds = _layout(lab, "whole", with_loop=True)
    doc = _summary(rounds, data, lab.args.dirty)
    sparse_data, sparse = _layout(lab, "sparse", with_loop=False)
    doc.update({f"rbd_sparse_{key.removeprefix('rbd_')}": value
                for key, value in _rbd_summary(sparse, sparse_data).items()})
    return doc


def _med(rounds: list[dict[str, Any]], key: str, field: str = "seconds") -> float:
    return median([float(getattr(r["taken"][key], field)) for r in rounds])


def _rbd_summary(rounds: list[dict[str, Any]], data: int) -> dict[str, Any]:
    """What both layouts report of the RBD disk."""
    dirty = rounds[-1]["dirty"]
    full, inc = _med(rounds, f"{RBD}_full"), _med(rounds, f"{RBD}_inc")
    stored = _med(rounds, f"{RBD}_inc", "stored_bytes")
    return {
        "rbd_data_bytes": data,
        "rbd_full_s": round(full, 3),
        "rbd_inc_s": round(inc, 3),
        "rbd_inc_ratio_to_full": round(inc / full, 4),
        "rbd_inc_bytes_transferred": int(_med(rounds, f"{RBD}_inc", "bytes_transferred")),
        "rbd_inc_stored_bytes": int(stored),
        "rbd_inc_stored_ratio_to_dirty": round(stored / dirty, 4),
        "rbd_inc_level": rounds[-1]["taken"][f"{RBD}_inc"].level,
        "rbd_verified_identical": rounds[0]["verified"],
        "rbd_snap_create_s": round(median(rounds[0]["snapshots"]), 3),
        "rbd_snap_create_runs_s": [round(v, 3) for v in rounds[0]["snapshots"]],
        "rbd_runs_s": {key: [round(r["taken"][key].seconds, 3) for r in rounds]
                       for key in rounds[0]["taken"]},
    }


def _summary(rounds: list[dict[str, Any]], data: int, fraction: float) -> dict[str, Any]:
    loop_inc = _med(rounds, f"{LOOP}_inc")
    doc = _rbd_summary(rounds, data)
    return {
        **doc,
        "rbd_dirty_fraction": fraction,
        "rbd_dirty_writes": rounds[-1]["writes"],
        "rbd_dirty_bytes": rounds[-1]["dirty"],
        "rbd_loop_full_s": round(_med(rounds, f"{LOOP}_full"), 3),
        "rbd_loop_inc_s": round(loop_inc, 3),
        "rbd_loop_inc_bytes_transferred": int(_med(rounds, f"{LOOP}_inc", "bytes_transferred")),
        "rbd_inc_ratio_vs_loop_inc": round(doc["rbd_inc_s"] / loop_inc, 3),
    }


def _print_runs(runs: dict[str, list[float]], rows: tuple[tuple[str, str], ...]) -> None:
    for key, label in rows:
        print(f"  {label + ':':<40}{median(runs[key]):8.3f} s   "
              f"runs {', '.join(f'{v:.3f}' for v in runs[key])}")


def print_rbd(doc: dict[str, Any]) -> None:
    if "rbd_not_measured" in doc:
        print(f"== rbd: not measured: {doc['rbd_not_measured']}\n")
        return
    print(f"== rbd: an RBD disk (RBD snapshots, diff_iterate) and a loop LUN (QEMU bitmap), "
          f"both fully written ({doc['rbd_data_bytes'] / MiB:.0f} MiB of random data); "
          f"{doc['rbd_dirty_writes']} guest writes of 64 KiB "
          f"({doc['rbd_dirty_bytes'] / MiB:.2f} MiB, {doc['rbd_dirty_fraction']:.0%}) to each")
    _print_runs(doc["rbd_runs_s"], ((f"{RBD}_full", "rbd full"), (f"{RBD}_inc", "rbd incremental"),
                                    (f"{LOOP}_full", "loop full"),
                                    (f"{LOOP}_inc", "loop incremental")))
    print(f"  rbd incremental / rbd full:            {goal(doc, 'rbd_inc_ratio_to_full')}")
    print(f"  rbd incremental / loop incremental:    {doc['rbd_inc_ratio_vs_loop_inc']:.3f}")
    print(f"  rbd incremental copied / stored:       "
          f"{doc['rbd_inc_bytes_transferred'] / MiB:.3f} / "
          f"{doc['rbd_inc_stored_bytes'] / MiB:.3f} MiB (loop copied "
          f"{doc['rbd_loop_inc_bytes_transferred'] / MiB:.3f} MiB)")
    print(f"  rbd stored / rewritten bytes:          {goal(doc, 'rbd_inc_stored_ratio_to_dirty')}")
    print(f"  context: one RBD snapshot created:     {doc['rbd_snap_create_s']:8.3f} s   runs "
          f"{', '.join(f'{v:.3f}' for v in doc['rbd_snap_create_runs_s'])}")
    print_verified(doc, "rbd_verified_identical", "RBD chain (full + incremental)")
    print(f"  context, the sparse layout ({doc['rbd_sparse_data_bytes'] / MiB:.0f} MiB of random "
          f"data in the same size, the same number of rewrites):")
    _print_runs(doc["rbd_sparse_runs_s"], ((f"{RBD}_full", "rbd full"),
                                           (f"{RBD}_inc", "rbd incremental")))
    print(f"  rbd incremental / rbd full (no goal):  {doc['rbd_sparse_inc_ratio_to_full']:.3f}")
    print(f"  rbd incremental copied / stored:       "
          f"{doc['rbd_sparse_inc_bytes_transferred'] / MiB:.3f} / "
          f"{doc['rbd_sparse_inc_stored_bytes'] / MiB:.3f} MiB "
          f"(stored / rewritten {doc['rbd_sparse_inc_stored_ratio_to_dirty']:.3f})")
    print_verified(doc, "rbd_sparse_verified_identical", "sparse RBD chain")
    print()
