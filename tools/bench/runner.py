"""The bench's command line: the sections run in order in one process, then the table and
the JSON line (``python -m tools.bench --help``)."""

from __future__ import annotations

import argparse
import compileall
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType
from typing import Any

from tools.bench import __doc__ as bench_doc
from tools.bench import (
    atrest,
    full,
    guestio,
    incremental,
    live,
    lun,
    mount,
    nbd,
    peer,
    prune,
    rbd,
    restore,
    resync,
    rss,
)
from tools.bench.common import AT_LEAST, DISK, GOALS, Lab, MiB, fill_lun, goal, goal_met, say
from tools.labkit import block_disk, domain_type, loop_device, rdmb_tmpdir, test_domain, unique_name

SECTIONS = ("full", "nbd", "incremental", "peer", "resync", "restore", "live", "mount", "prune",
            "lun", "rbd", "guestio", "atrest", "rss")
SHARED_LUN = frozenset({"full", "nbd", "incremental", "peer", "resync", "restore", "prune",
                        "guestio"})
LOADED_WINDOWS = lun.LOADED_WINDOWS


def _guestio(lab: Lab, _doc: dict[str, Any]) -> dict[str, Any]:
    assert lab.dom is not None
    return guestio.section_guestio(lab.dom, DISK, lab.size, lab.work)


Measure = Callable[[Lab, dict[str, Any]], dict[str, Any]]
Show = Callable[[dict[str, Any]], None]
# name -> (measure, print, a key its print needs in the document)
RUNS: dict[str, tuple[Measure, Show, str]] = {
    "full": (lambda lab, _doc: full.section_full(lab), full.print_full, "rdm_backup_s"),
    "nbd": (lambda lab, _doc: nbd.section_nbd(lab), nbd.print_nbd, "nbd_push_s"),
    "incremental": (lambda lab, _doc: incremental.section_incremental(lab),
                    incremental.print_incremental, "incremental_s"),
    "peer": (peer.section_peer, peer.print_peer, "virtnbdbackup_inc_s"),
    "resync": (lambda lab, _doc: resync.section_resync(lab), resync.print_resync, "resync"),
    "restore": (lambda lab, _doc: restore.section_restore(lab), restore.print_restore,
                "restore_s"),
    "live": (lambda lab, _doc: live.section_live(lab), live.print_live, "live_guest_reads_s"),
    "mount": (lambda lab, _doc: mount.section_mount(lab), mount.print_mount, "mount_s"),
    "prune": (lambda lab, _doc: prune.section_prune(lab), prune.print_prune, "prune_s"),
    "lun": (lambda lab, _doc: lun.section_lun(lab), lun.print_lun, "lun_paused_ms"),
    "rbd": (lambda lab, _doc: rbd.section_rbd(lab), rbd.print_rbd, "rbd_data_bytes"),
    "guestio": (_guestio, guestio.print_guestio, "guestio_direct_median_ms"),
    "atrest": (lambda lab, _doc: atrest.section_atrest(lab), atrest.print_atrest,
               "atrest_plain_s"),
    "rss": (lambda lab, _doc: rss.section_rss(lab), rss.print_rss, "rss_max_mib"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--help``); a bad value is one line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench",
                                     description=(bench_doc or "").split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=4096,
                        help="LUN size (default %(default)s)")
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
    parser.add_argument("--rss-size-gib", type=int, default=64,
                        help="rss: size of the sparse LUN (default %(default)s)")
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
    if args.rss_size_gib < 1:
        parser.error("--rss-size-gib must be >= 1")
    if args.windows < 1:
        parser.error("--windows must be >= 1")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    say(f"signal {signum}: cleaning up")
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


def compile_package() -> None:
    """Byte-compile the library as an installation does, so that the ``rdm-backup`` command
    the sections time never compiles its modules at start (``PYTHONDONTWRITEBYTECODE`` set)."""
    import libvirt_rdm_backup

    compileall.compile_dir(os.path.dirname(libvirt_rdm_backup.__file__), quiet=1)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections; the JSON document."""
    compile_package()
    size = args.size_mib * MiB
    doc: dict[str, Any] = {"sections": list(args.sections)}
    with ExitStack() as stack:
        work = stack.enter_context(rdmb_tmpdir())
        lun_file = work / "rdmb-lun.img"
        data_bytes = 0
        shared = set(args.sections) & SHARED_LUN
        if shared:  # the live, mount, lun and rss sections make LUNs of their own
            say(f"filling {lun_file} ({args.size_mib} MiB, {args.fill:.0%} random data)")
            data_bytes = fill_lun(lun_file, size, args.fill, args.extent_mib * MiB,
                                  args.seed, args.sparse)
        lab = Lab(args, work, size, data_bytes, lun_file)
        if "peer" in args.sections:
            # the same data before anything writes to the LUN; zeros stay unallocated
            lab.peer_image = work / "rdmb-peer.qcow2"
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                            str(lun_file), str(lab.peer_image)], check=True)
        if shared - {"peer"}:
            lab.device = stack.enter_context(loop_device(lun_file))
            lab.name = unique_name("rdmb-bench")
            say(f"starting domain {lab.name} ({domain_type()}) with {DISK} = {lab.device}")
            lab.dom = stack.enter_context(test_domain(lab.name, [block_disk(DISK, lab.device)]))
            doc.update(domain=lab.name, device=lab.device)
        doc.update(lun_bytes=size, data_bytes=data_bytes, fill=args.fill,
                   extent_bytes=args.extent_mib * MiB,
                   zeros="holes" if args.sparse else "written", page_cache_dropped=True,
                   domain_type=domain_type(), settle_s=args.settle, repeat=args.repeat)
        for name in args.sections:
            doc.update(RUNS[name][0](lab, doc))
        # same --fill and --seed as the shared LUN
        for key in ("live_data_bytes", "lun_data_bytes", "rbd_data_bytes", "atrest_data_bytes"):
            if key in doc and not data_bytes:
                doc["data_bytes"] = data_bytes = doc[key]
        doc["goals"] = {k: v for k, v in GOALS.items() if k in doc}
        doc["goals_at_least"] = sorted(k for k in doc["goals"] if k in AT_LEAST)
        doc["goals_met"] = {k: goal_met(k, doc[k]) for k in doc["goals"]}
        doc["workdir"] = str(work)
        return doc


def print_goals(doc: dict[str, Any]) -> None:
    """Every measured value that has a goal, in one list."""
    if not doc["goals"]:
        return
    met = sum(doc["goals_met"].values())
    print(f"== goals ({met} of {len(doc['goals'])} met; measured in this run, never asserted)")
    for key in doc["goals"]:
        print(f"  {key:<40} {goal(doc, key)}")
    print()


def print_table(doc: dict[str, Any]) -> None:
    """The human-readable report, section by section."""
    lun_bytes = doc["lun_bytes"]
    loops = SHARED_LUN | {"live", "mount", "atrest"}
    where = ("loop device over a file in /var/tmp/rdmb-*" if set(doc["sections"]) & loops
             else "an RBD image of the lab's Ceph beside a loop device" if "rbd" in doc["sections"]
             else "iSCSI LUNs over files on the reflink XFS")
    kind = "text" if doc["sections"] == ["atrest"] else "random"
    print(f"LUN: {lun_bytes / MiB:.0f} MiB {where} "
          f"({doc['data_bytes'] / MiB:.0f} MiB {kind} data in "
          f"{doc['extent_bytes'] // MiB} MiB extents, zeros {doc['zeros']}); "
          f"domain type {doc['domain_type']}; sections: {', '.join(doc['sections'])}")
    print(f"Each measured run follows `sync; echo 3 > /proc/sys/vm/drop_caches` (page cache "
          f"dropped) and a {doc['settle_s']} s pause; medians of {doc['repeat']} round(s).")
    print()
    for name in doc["sections"]:
        _measure, show, first_key = RUNS[name]
        if first_key in doc:
            show(doc)
    print_goals(doc)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.bench``: 0, or 2 for a bad argument or a missing prerequisite."""
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
        print_table(doc)
    print(json.dumps(doc, sort_keys=True), flush=True)
    return 0
