"""Section ``peer``: Debian's ``virtnbdbackup`` full and incremental on a qcow2 disk with the
same data and the same rewrites, as whole commands."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from tools.bench.common import (
    DISK,
    Lab,
    MiB,
    allocated_bytes,
    dirty_offsets,
    goal,
    median,
    remove_tree,
    rewrite,
    say,
    settle,
)
from tools.labkit import URI, qcow2_disk, test_domain, unique_name


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
