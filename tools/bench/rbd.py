"""Section ``rbd``: an RBD disk backed up through RBD snapshots, against a loop LUN of the same
size and data backed up through QEMU's dirty bitmap.

A file of ``--size-mib`` gets the bench's ``--fill`` of random data; it becomes a loop device
(``vdb``, ``<disk type='block' device='disk'>``) and is copied into a thin RBD image of the
lab's cluster (``vdc``, ``<disk type='network'>`` through the lab's cephx secret), both disks
of one firmware-only domain. ``--repeat`` rounds, each in fresh repositories and each
measurement after the page-cache drop: a full backup of vdc, a full of vdb, ``--dirty`` (1%)
of both rewritten by the guest side at the same offsets (HMP ``qemu-io``, 64 KiB writes), an
incremental of vdc (the extents ``diff_iterate`` reports between the two RBD snapshots) and
one of vdb (QEMU's bitmap). Reported: RBD incremental time / RBD full time (goal <= 0.05),
RBD incremental time / loop incremental time (context), the bytes each incremental copied
and stored; the first round's RBD chain is compared with the image (``qemu-img compare``).
The image, with the snapshots the chains keep, is removed at the end.
"""

from __future__ import annotations

import subprocess
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
from tools.labkit import block_disk, loop_device, test_domain, unique_name

LOOP, RBD = "vdb", "vdc"


def _round(lab: Lab, name: str, round_no: int, image: cephkit.RbdImage) -> dict[str, Any]:
    """One round: fulls, the same rewrites on both disks, incrementals."""
    args = lab.args
    assert lab.dom is not None
    repos = {disk: lab.work / f"rdmb-rbd-{disk}-{round_no}" for disk in (RBD, LOOP)}
    taken: dict[str, Taken] = {}
    try:
        for disk in (RBD, LOOP):
            settle(args)
            taken[f"{disk}_full"] = timed_backup(name, repos[disk], "full", disk)
        offsets = dirty_offsets(lab.size, args.dirty, f"rdmb-rbd-dirty-{args.seed}-{round_no}")
        dirty = rewrite(lab.dom, offsets, 0x50 + round_no, RBD)
        rewrite(lab.dom, offsets, 0x50 + round_no, LOOP)
        for disk in (RBD, LOOP):
            settle(args)
            taken[f"{disk}_inc"] = timed_backup(name, repos[disk], "incremental", disk)
        verified = None
        if round_no == 0 and not args.no_verify:
            verified = same_content(image.qemu_uri, taken[f"{RBD}_inc"].image, "qcow2")
    finally:
        for repo in repos.values():
            remove_tree(repo)
    say(f"rbd round {round_no + 1}/{args.repeat}: rbd full {taken[RBD + '_full'].seconds:.2f} s, "
        f"inc {taken[RBD + '_inc'].seconds:.3f} s; loop full "
        f"{taken[LOOP + '_full'].seconds:.2f} s, inc {taken[LOOP + '_inc'].seconds:.3f} s")
    return {"taken": taken, "dirty": dirty, "writes": len(offsets), "verified": verified}


def section_rbd(lab: Lab) -> dict[str, Any]:
    """Full and incremental of an RBD disk and of a loop LUN with the same data."""
    args = lab.args
    why = cephkit.unavailable()
    if why is not None:
        say(f"rbd: not measured: {why}")
        return {"rbd_not_measured": why}
    lun_file = lab.work / "rdmb-rbd-lun.img"
    data = fill_lun(lun_file, lab.size, args.fill, args.extent_mib * MiB, args.seed, args.sparse)
    rounds = []
    with cephkit.rbd_image(lab.size) as image, loop_device(str(lun_file)) as device:
        say(f"rbd: copying {lun_file} into {image.spec}")
        subprocess.run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O",
                        "raw", str(lun_file), image.qemu_uri], check=True, timeout=3600)
        name = unique_name("rdmb-bench-rbd")
        with test_domain(name, [block_disk(LOOP, device), cephkit.rbd_disk(RBD, image)]) as dom:
            shared = lab.dom, lab.name  # the shared LUN's domain, for the sections after this
            lab.dom, lab.name = dom, name
            try:
                for round_no in range(args.repeat):
                    rounds.append(_round(lab, name, round_no, image))
            finally:
                lab.dom, lab.name = shared
    lun_file.unlink()
    return _summary(rounds, data, args.dirty)


def _summary(rounds: list[dict[str, Any]], data: int, fraction: float) -> dict[str, Any]:
    def med(key: str, field: str = "seconds") -> float:
        return median([float(getattr(r["taken"][key], field)) for r in rounds])

    dirty = rounds[-1]["dirty"]
    rbd_full, rbd_inc = med(f"{RBD}_full"), med(f"{RBD}_inc")
    loop_full, loop_inc = med(f"{LOOP}_full"), med(f"{LOOP}_inc")
    stored = med(f"{RBD}_inc", "stored_bytes")
    return {
        "rbd_data_bytes": data,
        "rbd_dirty_fraction": fraction,
        "rbd_dirty_writes": rounds[-1]["writes"],
        "rbd_dirty_bytes": dirty,
        "rbd_full_s": round(rbd_full, 3),
        "rbd_inc_s": round(rbd_inc, 3),
        "rbd_inc_ratio_to_full": round(rbd_inc / rbd_full, 4),
        "rbd_inc_bytes_transferred": int(med(f"{RBD}_inc", "bytes_transferred")),
        "rbd_inc_stored_bytes": int(stored),
        "rbd_inc_stored_ratio_to_dirty": round(stored / dirty, 4),
        "rbd_inc_level": rounds[-1]["taken"][f"{RBD}_inc"].level,
        "rbd_loop_full_s": round(loop_full, 3),
        "rbd_loop_inc_s": round(loop_inc, 3),
        "rbd_loop_inc_bytes_transferred": int(med(f"{LOOP}_inc", "bytes_transferred")),
        "rbd_inc_ratio_vs_loop_inc": round(rbd_inc / loop_inc, 3),
        "rbd_verified_identical": rounds[0]["verified"],
        "rbd_runs_s": {key: [round(r["taken"][key].seconds, 3) for r in rounds]
                       for key in (f"{RBD}_full", f"{RBD}_inc", f"{LOOP}_full", f"{LOOP}_inc")},
    }


def print_rbd(doc: dict[str, Any]) -> None:
    if "rbd_not_measured" in doc:
        print(f"== rbd: not measured: {doc['rbd_not_measured']}\n")
        return
    runs = doc["rbd_runs_s"]
    print(f"== rbd: an RBD disk (RBD snapshots, diff_iterate) and a loop LUN (QEMU bitmap) of "
          f"the same size and data; {doc['rbd_dirty_writes']} guest writes of 64 KiB "
          f"({doc['rbd_dirty_bytes'] / MiB:.2f} MiB, {doc['rbd_dirty_fraction']:.0%}) to each")
    for key, label in ((f"{RBD}_full", "rbd full"), (f"{RBD}_inc", "rbd incremental"),
                       (f"{LOOP}_full", "loop full"), (f"{LOOP}_inc", "loop incremental")):
        print(f"  {label + ':':<40}{median(runs[key]):8.3f} s   "
              f"runs {', '.join(f'{v:.3f}' for v in runs[key])}")
    print(f"  rbd incremental / rbd full:            {goal(doc, 'rbd_inc_ratio_to_full')}")
    print(f"  rbd incremental / loop incremental:    {doc['rbd_inc_ratio_vs_loop_inc']:.3f}")
    print(f"  rbd incremental copied / stored:       "
          f"{doc['rbd_inc_bytes_transferred'] / MiB:.3f} / "
          f"{doc['rbd_inc_stored_bytes'] / MiB:.3f} MiB (loop copied "
          f"{doc['rbd_loop_inc_bytes_transferred'] / MiB:.3f} MiB)")
    print(f"  rbd stored / rewritten bytes:          {goal(doc, 'rbd_inc_stored_ratio_to_dirty')}")
    print_verified(doc, "rbd_verified_identical", "RBD chain (full + incremental)")
    print()
