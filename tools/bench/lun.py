"""Section ``lun``: passthrough iSCSI LUNs backed up through storage snapshots: the pause
window (idle and under a ``dd`` load), a full backup of one LUN against ``qemu-img convert``
of it, and an incremental after 1% rewritten."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import libvirt

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.backup import BackupResult
from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.storage import tgt
from libvirt_rdm_backup.storage.clones import SNAPSHOT_DIR
from libvirt_rdm_backup.storage.snapshot_agents import agent_by_name
from libvirt_rdm_backup.storage.snapshots import StorageSnapshot
from tools.bench.common import (
    Lab,
    MiB,
    allocated_bytes,
    dirty_offsets,
    fill_lun,
    goal,
    median,
    print_timings,
    remove_tree,
    rewrite,
    run_convert,
    same_content,
    say,
    settle,
)
from tools.labkit import (
    IscsiLun,
    block_disk,
    domain_type,
    iscsi_disk,
    iscsi_target,
    loop_device,
    rdmb_reflink_tmpdir,
    test_domain,
    unique_name,
)

LUNS = ("sda", "sdb")  # the passthrough LUNs; sda is the one measured alone
LUN_BLOCK = "vdb"  # the block-layer disk
LOADED_WINDOWS = 20  # backups whose windows are measured while a dd loads the storage


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


def fsync_file(path: Path) -> None:
    """Write a file's dirty pages to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    synced: dict[str, list[float]] = {key: [] for key in LUN_METHODS[1:]}
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
                        started = time.monotonic()
                        seconds = run_convert(url, image, fmt)
                        fsync_file(image)  # the backup's layer is on disk when it returns
                        synced[key].append(time.monotonic() - started)
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
        "qemu_img_convert_raw_synced_s": round(median(synced["qemu_img_convert_raw_s"]), 3),
        "lun_full_ratio_vs_convert_raw_synced":
            round(full_s / median(synced["qemu_img_convert_raw_s"]), 3),
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
    print_timings("full copy of sda",
                  (("lun_full_s", "rdm-backup (api.backup, sda only)"),
                   ("qemu_img_convert_raw_s", "qemu-img convert -f raw -O raw"),
                   ("qemu_img_convert_qcow2_s", "qemu-img convert -f raw -O qcow2")),
                  doc, runs, size, 40)
    print(f"  ratio = rdm-backup time / convert time (below 1: rdm-backup is faster); "
          f"{_paths(doc['lun_full_disks'])}")
    print(f"    vs convert -O raw:                   {goal(doc, 'lun_full_ratio_vs_convert_raw')}")
    print(f"    vs convert -O qcow2:                 "
          f"{goal(doc, 'lun_full_ratio_vs_convert_qcow2')}")
    print(f"    vs convert -O raw + fsync of its file: "
          f"{doc['lun_full_ratio_vs_convert_raw_synced']:.3f}   (context: the backup fsyncs "
          f"its layer; convert with fsync {doc['qemu_img_convert_raw_synced_s']:.3f} s)")
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
