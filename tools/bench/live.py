"""Section ``live``: ``rdm-backup restore --live`` of the tiny real guest
(:mod:`tools.guestkit`): how soon the guest reads its backup point, how fast its LUN is
written back meanwhile.

A LUN of its own: a file of ``--size-mib`` filled as the shared one (``--fill`` of random data
in ``--extent-mib`` extents), a loop device, ``vda`` of the tiny guest (TCG, direct kernel
boot). A full backup of it into a repository (not measured), the point restored to a file (not
measured), the domain destroyed and the LUN's contents destroyed (its file truncated to 0 and
back: all zeros). Then, after the page-cache drop, timed from the start of the command
``rdm-backup restore DOMAIN --target REPO --live --json`` (a process):

- ``live_running_s``: until the domain runs (the tool's own ``running_after_seconds`` beside it);
- ``live_guest_reads_s``: until the guest, once its command loop answers, has read 1 MiB with
  ``dd iflag=direct`` from the start of the last random extent (near the end of the disk: the
  copy reaches it last) and its md5 equals the point's (goal <= 10 s); whether the copy was
  still running then (``live_read_during_copy``: read through the overlay from the backup);
- the copy back: the LUN's bytes / (the tool's ``seconds`` - ``running_after_seconds``), against
  ``dd`` of the point file onto the same loop device (the LUN truncated again, page cache
  dropped; ``bs=4M iflag=direct oflag=direct conv=fsync``): ratio of throughputs (goal >= 0.8);
- the baseline, ``live_plain_boot_reads_s``: the same guest then started plainly on its
  restored LUN (after the page-cache drop), timed the same way until it read the same
  megabyte; ``live_reads_over_plain_boot_s`` is what the live restore adds to it.

Unless ``--no-verify``, the LUN is compared with the point (``qemu-img compare``) once the
domain is gone. One round (the guest's boot dominates). The domain, the loop device, the files
and the tool's scratch directory are removed in ``finally`` blocks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.live_restore import scratch_dir
from tools.bench.common import (
    Lab,
    MiB,
    data_extents,
    fill_lun,
    goal,
    remove_tree,
    same_content,
    say,
    settle,
)
from tools.bench.restore import run_dd_copy
from tools.guestkit import Guest, guest_vm
from tools.labkit import block_disk, loop_device, unique_name
from tools.livekit import finish_live_restore, guest_md5, start_live_restore, stop, wait_running

LIVE_DISK = "vda"
READ = MiB  # what the guest reads and compares
RUNNING_TIMEOUT = 120.0  # seconds until the domain must run
COPY_TIMEOUT = 3600.0  # seconds the whole command may take


def md5_of(path: Path, offset: int, length: int) -> str:
    """The md5 of ``length`` bytes of a file at ``offset``."""
    with path.open("rb") as stream:
        stream.seek(offset)
        return hashlib.md5(stream.read(length)).hexdigest()


def wipe(path: Path, size: int) -> None:
    """Destroy a LUN file's contents: truncated to 0 and back (zeros, unallocated)."""
    with path.open("r+b") as stream:
        stream.truncate(0)
        stream.truncate(size)
        os.fsync(stream.fileno())


def timed_live(lab: Lab, guest: Guest, repo: Path, offset: int, expected: str) -> dict[str, Any]:
    """``restore --live`` timed from its start: running, guest reading, done (see the module)."""
    settle(lab.args)
    started = time.monotonic()
    proc = start_live_restore(guest.name, str(repo))
    try:
        wait_running(guest.dom, proc, RUNNING_TIMEOUT)
        running_s = time.monotonic() - started
        guest.wait_ready()
        ready_s = time.monotonic() - started
        read = guest_md5(guest, offset, READ)
        reads_s = time.monotonic() - started
        during = proc.poll() is None  # through the overlay, or from the LUN copied already
        say(f"live: running after {running_s:.2f} s, guest answering after {ready_s:.2f} s, "
            f"read the point after {reads_s:.2f} s ({'correct' if read == expected else 'WRONG'})")
        document = finish_live_restore(proc, COPY_TIMEOUT)
    finally:
        stop(proc)
    total = float(document["seconds"])
    running_tool = float(document["running_after_seconds"])
    copy_s = total - running_tool
    say(f"live: the tool ran the guest after {running_tool:.2f} s, done after {total:.2f} s")
    return {
        "live_running_s": round(running_s, 3),
        "live_running_after_tool_s": round(running_tool, 3),
        "live_guest_ready_s": round(ready_s, 3),
        "live_guest_reads_s": round(reads_s, 3),
        "live_guest_read_correct": read == expected,
        "live_read_during_copy": during,
        "live_total_s": round(total, 3),
        "live_copy_s": round(copy_s, 3),
        "live_copy_mib_s": round(lab.size / MiB / copy_s, 1),
        "live_pivoted": [d.get("pivoted") for d in document["disks"]],
    }


def _on_guest(lab: Lab, guest: Guest, paths: dict[str, Path], offset: int) -> dict[str, Any]:
    """Backup, point, domain and LUN destroyed, then the timed live restore."""
    guest.wait_path(f"/sys/block/{LIVE_DISK}")
    api.backup(guest.name, str(paths["repo"]), disks=[LIVE_DISK], level="full")
    api.restore(guest.name, str(paths["repo"]), LIVE_DISK, str(paths["point"]))
    expected = md5_of(paths["point"], offset, READ)
    guest.dom.destroy()
    guest.close()
    wipe(paths["lun"], lab.size)
    doc = timed_live(lab, guest, paths["repo"], offset, expected)
    doc.update(plain_boot(lab, guest, offset, expected))
    doc["live_reads_over_plain_boot_s"] = round(
        doc["live_guest_reads_s"] - doc["live_plain_boot_reads_s"], 3)
    return doc


def plain_boot(lab: Lab, guest: Guest, offset: int, expected: str) -> dict[str, Any]:
    """The baseline: the same guest started plainly on its restored LUN (``virsh start``),
    timed the same way until it read the same megabyte."""
    guest.dom.destroy()
    guest.close()
    settle(lab.args)
    started = time.monotonic()
    guest.dom.create()
    guest.wait_ready()
    read = guest_md5(guest, offset, READ)
    seconds = time.monotonic() - started
    say(f"live: a plain start read the same data after {seconds:.2f} s")
    return {"live_plain_boot_reads_s": round(seconds, 3),
            "live_plain_boot_read_correct": read == expected}


def section_live(lab: Lab) -> dict[str, Any]:
    """The live restore of the tiny guest's LUN (see the module)."""
    args = lab.args
    extent = args.extent_mib * MiB
    paths = {key: lab.work / f"rdmb-live-{key}" for key in ("lun", "repo", "point")}
    name = unique_name("rdmb-bench-live")
    doc: dict[str, Any] = {"live_lun_bytes": lab.size, "live_domain": name}
    try:
        say(f"live: filling {paths['lun']} ({args.size_mib} MiB, {args.fill:.0%} random data)")
        doc["live_data_bytes"] = fill_lun(paths["lun"], lab.size, args.fill, extent, args.seed,
                                          args.sparse)
        extents = data_extents(lab.size, args.fill, extent, args.seed)
        offset = max(extents) * extent if extents else lab.size - READ
        doc["live_read_offset"] = offset
        with loop_device(paths["lun"]) as loop:
            say(f"live: booting {name} (the tiny guest, TCG) with {LIVE_DISK} = {loop}")
            with guest_vm(name, [block_disk(LIVE_DISK, loop)]) as guest:
                doc["live_first_boot_s"] = round(guest.boot_seconds or 0.0, 3)
                try:
                    doc.update(_on_guest(lab, guest, paths, offset))
                finally:
                    shutil.rmtree(scratch_dir(guest.dom.UUIDString()), ignore_errors=True)
            doc["live_verified_identical"] = (None if args.no_verify
                                              else same_content(loop, paths["point"], "raw"))
            wipe(paths["lun"], lab.size)
            settle(args)
            dd_s = run_dd_copy(str(paths["point"]), loop)
            say(f"live: dd of the point onto the LUN: {dd_s:.2f} s")
    finally:
        for path in paths.values():
            remove_tree(path)
    doc.update(live_dd_s=round(dd_s, 3), live_dd_mib_s=round(lab.size / MiB / dd_s, 1),
               live_copy_throughput_ratio_vs_dd=round(dd_s / doc["live_copy_s"], 3))
    return doc


def print_live(doc: dict[str, Any]) -> None:
    check = doc["live_verified_identical"]
    print(f"== live: restore --live of the tiny guest's {doc['live_lun_bytes'] / MiB:.0f} MiB LUN "
          f"({doc['live_data_bytes'] / MiB:.0f} MiB random data), timed from the command's start")
    print(f"  domain running after:            {doc['live_running_s']:8.3f} s   (the tool: "
          f"{doc['live_running_after_tool_s']:.3f} s; first boot took "
          f"{doc['live_first_boot_s']:.1f} s)")
    print(f"  guest answering after:           {doc['live_guest_ready_s']:8.3f} s")
    print(f"  guest read the point after, s:   {goal(doc, 'live_guest_reads_s')}   "
          f"(1 MiB at {doc['live_read_offset'] / MiB:.0f} MiB: "
          f"{'correct' if doc['live_guest_read_correct'] else 'WRONG'}, "
          f"{'while the copy ran' if doc['live_read_during_copy'] else 'the copy had ended'})")
    print(f"  a plain start of the restored guest read it after: "
          f"{doc['live_plain_boot_reads_s']:.3f} s (live restore adds "
          f"{doc['live_reads_over_plain_boot_s']:.3f} s: the rest is the guest's own boot)")
    print(f"  copy back: {doc['live_copy_s']:.3f} s ({doc['live_copy_mib_s']:.0f} MiB/s; the "
          f"command took {doc['live_total_s']:.3f} s); dd of the point onto the LUN: "
          f"{doc['live_dd_s']:.3f} s ({doc['live_dd_mib_s']:.0f} MiB/s)")
    print(f"  copy throughput / dd throughput: {goal(doc, 'live_copy_throughput_ratio_vs_dd')}")
    if check is not None:
        print(f"  the LUN afterwards vs the point (qemu-img compare): "
              f"{'identical' if check else 'DIFFERENT'}")
    print()
