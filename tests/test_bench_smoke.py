"""Smoke test of the bench (``python -m tools.bench``) on small LUNs: it runs, cleans up and
reports sane numbers. One run of every section serves all the tests of this module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB
KEYS = (
    "lun_bytes",
    "data_bytes",
    "rdm_backup_s",
    "dd_s",
    "virsh_backup_begin_s",
    "ratio_vs_dd",
    "ratio_vs_backup_begin",
    "stored_bytes",
    "stored_ratio_to_data",
)
INCREMENTAL_KEYS = (
    "dirty_bytes",
    "incremental_full_s",
    "incremental_s",
    "incremental_ratio_to_full",
    "incremental_stored_bytes",
    "incremental_stored_ratio_to_dirty",
    "incremental_cli_s",
    "ratio_inc_cli_vs_api",
)
NBD_KEYS = (
    "file_target_s",
    "nbd_push_s",
    "qemu_img_convert_nbd_s",
    "ratio_nbd_push_vs_file_target",
    "ratio_nbd_push_vs_convert_nbd",
    "nbd_volume_stored_bytes",
    "nbd_volume_stored_ratio_to_data",
    "file_target_stored_bytes",
    "qemu_img_convert_nbd_stored_bytes",
    "nbd_push_bytes_transferred",
)
PEER_KEYS = (
    "virtnbdbackup_full_s",
    "virtnbdbackup_inc_s",
    "ratio_inc_vs_virtnbdbackup_inc",
)
RESTORE_KEYS = (
    "restore_s",
    "restore_dd_s",
    "restore_mib_s",
    "restore_dd_mib_s",
    "restore_throughput_ratio_vs_dd",
)
RSS_KEYS = ("rss_max_mib",)
LIVE_KEYS = (
    "live_running_s",
    "live_running_after_tool_s",
    "live_guest_ready_s",
    "live_guest_reads_s",
    "live_copy_s",
    "live_copy_mib_s",
    "live_dd_s",
    "live_plain_boot_reads_s",
    "live_copy_throughput_ratio_vs_dd",
)
MOUNT_KEYS = ("mount_s", "mount_no_verify_s", "umount_s", "mount_data_bytes")
LUN_KEYS = (
    "lun_paused_ms",
    "lun_full_s",
    "qemu_img_convert_raw_s",
    "qemu_img_convert_qcow2_s",
    "lun_full_ratio_vs_convert_raw",
    "lun_full_ratio_vs_convert_qcow2",
    "lun_full_ratio_vs_convert_raw_synced",
    "lun_inc_s",
    "lun_inc_ratio_to_full",
    "lun_inc_stored_bytes",
    "lun_dirty_bytes",
    "lun_inc_stored_ratio_to_dirty",
    "lun_loaded_paused_p50_ms",
    "lun_loaded_paused_worst_ms",
)


def _positive_numbers(doc: dict[str, object], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = doc.get(key)
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)


def _virsh_names() -> list[str]:
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                             capture_output=True, text=True, check=True)
    return domains.stdout.split()


def _tgt_targets() -> str:
    shown = subprocess.run(["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "target"],
                           capture_output=True, text=True, check=True)
    return shown.stdout


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as stream:
                cmdline = stream.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.bench", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def bench_run() -> tuple[subprocess.CompletedProcess[str], bool]:
    """Every section once on 64 MiB LUNs (the rss section on a 2 GiB sparse one), without
    the pause after each cache drop; whether the peer section ran."""
    # the peer section needs Debian's virtnbdbackup (tools/lab.sh installs it)
    peer = shutil.which("virtnbdbackup") is not None
    sections = "full,nbd,incremental,peer,resync,restore,live,mount,prune,lun,guestio,rss"
    if not peer:
        sections = sections.replace("peer,", "")
    proc = _bench("--size-mib", "64", "--repeat", "1", "--windows", "3", "--settle", "0",
                  "--rss-size-gib", "2", "--sections", sections, "--json", timeout=480)
    return proc, peer


def test_bench_small_lun_reports_all_numbers(
    bench_run: tuple[subprocess.CompletedProcess[str], bool]
) -> None:
    proc, peer = bench_run
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: only the JSON line on stdout
    doc = json.loads(lines[0])
    _positive_numbers(doc, KEYS + NBD_KEYS + INCREMENTAL_KEYS + LUN_KEYS + RESTORE_KEYS
                      + RSS_KEYS + (PEER_KEYS if peer else ()))
    assert doc["lun_bytes"] == 64 * MiB
    assert doc["data_bytes"] == 16 * MiB  # --fill 0.25 by default
    # zeros take no space: the stored backup is about the size of the data, not of the LUN
    assert 0.9 <= doc["stored_ratio_to_data"] <= 1.5, doc
    assert all(doc["verified_identical"].values()), doc["verified_identical"]

    # nbd: the same LUN pushed into a volume served by `rdm-backup receive`, to a file
    # repository and by qemu-img convert into a plain qemu-nbd export; all three copies are
    # the LUN, and the volume file stores the data, not the zeros
    assert doc["nbd_verified_identical"] == {
        "file_target_s": True, "nbd_push_s": True, "qemu_img_convert_nbd_s": True}, doc
    assert doc["nbd_push_bytes_transferred"] <= doc["lun_bytes"], doc
    assert 0.9 <= doc["nbd_volume_stored_ratio_to_data"] <= 1.5, doc
    assert doc["nbd_server_problems"] == [] and doc["nbd_qemu_leftovers"] == [], doc
    assert len(doc["nbd_server_pids"]) >= 3, doc  # receive, its qemu-nbd, the plain qemu-nbd

    # incremental: 1% of 64 MiB is 10 writes of 64 KiB; each rewritten cluster is copied
    # once, and the layer is far smaller than the full backup
    assert doc["dirty_writes"] == 10 and doc["dirty_bytes"] == 10 * 64 * KiB, doc
    assert doc["incremental_bytes_transferred"] == doc["dirty_bytes"], doc
    assert doc["incremental_stored_bytes"] < doc["stored_bytes"] / 4, doc
    assert doc["incremental_verified_identical"] is True
    assert set(doc["goals"]) >= {"incremental_ratio_to_full",
                                 "incremental_stored_ratio_to_dirty"}
    # resync: measured where the library has the level, else said so
    if doc["resync"] == "measured":
        _positive_numbers(doc, ("resync_s", "resync_ratio_to_full", "resync_stored_bytes"))
        assert doc["resync_verified_identical"] is True
    else:
        assert doc["resync"] == "not measured (level not available)", doc["resync"]
        assert "resync: not measured (level not available)" in proc.stderr

    # restore: both the restored device and dd's copy are the LUN
    assert doc["restore_verified_identical"] == {"restore_s": True, "restore_dd_s": True}, doc
    # rss: each rdm-backup process measured on the sparse LUN
    assert doc["rss_lun_bytes"] == 2 * 1024 * MiB, doc
    assert set(doc["rss_peak_mib"]) == {"backup_full", "backup_incremental", "restore"}, doc
    assert all(value > 0 for value in doc["rss_peak_mib"].values()), doc
    assert "rdmb" in doc["rss_domain"] and doc["rss_domain"] not in _virsh_names()
    # every ratio with a goal is reported with it and whether it was met
    assert set(doc["goals"]) >= {"ratio_nbd_push_vs_file_target", "ratio_inc_cli_vs_api",
                                 "restore_throughput_ratio_vs_dd", "rss_max_mib",
                                 "lun_full_ratio_vs_convert_raw", "incremental_ratio_to_full"}
    assert set(doc["goals_met"]) == set(doc["goals"]), doc
    assert doc["goals_at_least"] == ["live_copy_throughput_ratio_vs_dd",
                                     "restore_throughput_ratio_vs_dd"], doc

    # lun: two passthrough LUNs snapshotted by the storage, the guest held briefly; the
    # incremental reads only what the storage reports as changed
    assert doc["lun_size_bytes"] == 64 * MiB and doc["lun_dirty_bytes"] == 10 * 64 * KiB, doc
    assert doc["lun_paused_ms"] > 0 and doc["lun_paused_method"] == "pause", doc
    window = doc["lun_window_disks"]
    assert {d: window[d]["data_path"] for d in window} == {
        "sda": "snapshot", "sdb": "snapshot", "vdb": "qemu"}, window
    assert doc["lun_full_disks"]["sda"] == {
        "data_path": "snapshot", "level": "full", "agent": "tgt-reflink"}, doc
    assert doc["lun_inc_disks"]["sda"]["data_path"] == "snapshot", doc["lun_inc_disks"]
    assert doc["lun_inc_disks"]["sda"]["level"] == "incremental", doc["lun_inc_disks"]
    assert doc["lun_inc_bytes_transferred"] == doc["lun_dirty_bytes"], doc
    assert doc["lun_inc_stored_bytes"] < doc["lun_full_stored_bytes"] / 4, doc
    assert all(doc["lun_verified_identical"].values()), doc["lun_verified_identical"]
    assert set(doc["goals"]) >= {"lun_paused_ms", "lun_full_ratio_vs_convert_raw",
                                 "lun_inc_ratio_to_full", "lun_loaded_paused_worst_ms"}
    # the window under load: 20 backups while a dd rewrites a LUN's backing file
    assert len(doc["lun_loaded_runs_ms"]) == 3 and "dd" in doc["lun_loaded_load"], doc

    # nothing the bench made is left behind: its directories, loop devices, iSCSI targets
    # (the LUNs' and those presenting their snapshots), snapshot clones and domains are gone
    assert "rdmb" in doc["workdir"] and "rdmb" in doc["domain"]
    assert not Path(doc["workdir"]).exists()
    assert "rdmb" in doc["lun_backing_dir"] and not Path(doc["lun_backing_dir"]).exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert doc["workdir"] not in loops.stdout
    assert _processes_mentioning(doc["workdir"]) == []  # no NBD server still serves a file
    assert doc["lun_backing_dir"] not in loops.stdout
    targets = _tgt_targets()
    for iqn in doc["lun_iqns"].values():
        assert "rdmb" in iqn and iqn not in targets, (iqn, targets)
    names = _virsh_names()
    assert doc["domain"] not in names
    assert "rdmb" in doc["lun_domain"] and doc["lun_domain"] not in names
    if peer:
        assert "rdmb" in doc["peer_domain"] and doc["peer_domain"] not in names


def test_bench_guestio_section_reports_guest_write_latency(
    bench_run: tuple[subprocess.CompletedProcess[str], bool]
) -> None:
    proc, _peer = bench_run
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip())
    runs = ("no_backup", "direct", "fleecing")
    _positive_numbers(doc, tuple(f"guestio_{run}_{what}" for run in runs
                                 for what in ("median_ms", "worst_ms", "ratio")))
    # every write of the no-backup and fleecing runs reached the disk
    assert doc["guestio_no_backup_failed"] == 0 and doc["guestio_fleecing_failed"] == 0, doc
    assert not Path(doc["workdir"]).exists() and doc["domain"] not in _virsh_names()


def test_bench_prune_section_reports_what_moved(
    bench_run: tuple[subprocess.CompletedProcess[str], bool]
) -> None:
    proc, _peer = bench_run
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip())
    _positive_numbers(doc, ("prune_s", "prune_bytes_moved", "prune_bytes_must_move",
                            "prune_moved_ratio"))
    assert doc["prune_direction"] in ("up", "down")
    # what the prune reports moving is what the kept layer grew by (its plan was right)
    assert abs(doc["prune_bytes_reported"] - doc["prune_bytes_moved"]) <= \
        doc["prune_bytes_moved"] // 10
    assert doc["prune_verified_identical"] is True


def test_bench_live_and_mount_sections_report_their_times(
    bench_run: tuple[subprocess.CompletedProcess[str], bool]
) -> None:
    proc, _peer = bench_run
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip())
    _positive_numbers(doc, LIVE_KEYS + MOUNT_KEYS)
    # live: the guest read its point, the LUN is the point once the copy is done
    assert doc["live_lun_bytes"] == 64 * MiB and doc["live_data_bytes"] == 16 * MiB, doc
    assert doc["live_guest_read_correct"] is True and doc["live_pivoted"] == [True], doc
    assert doc["live_plain_boot_read_correct"] is True, doc
    assert doc["live_reads_over_plain_boot_s"] == round(
        doc["live_guest_reads_s"] - doc["live_plain_boot_reads_s"], 3), doc
    assert doc["live_verified_identical"] is True, doc
    assert isinstance(doc["live_read_during_copy"], bool), doc
    assert doc["live_running_s"] <= doc["live_guest_ready_s"] <= doc["live_guest_reads_s"], doc
    # mount: both ways mounted the ext4, its files read back as written
    checks = doc["mount_checks"]
    assert checks["mount_s"]["verified"] is True and checks["mount_no_verify_s"]["verified"] \
        is False, checks
    assert all(c["mounted"] == [True] and c["small_files_ok"] for c in checks.values()), checks
    assert doc["mount_verified_identical"] is True, doc
    assert set(doc["goals"]) >= {"live_guest_reads_s", "live_copy_throughput_ratio_vs_dd"}
    names = _virsh_names()
    for key in ("live_domain", "mount_domain"):
        assert "rdmb" in doc[key] and doc[key] not in names, doc[key]
    assert _processes_mentioning(doc["workdir"]) == []  # no mount supervisor, no nbdfuse left


def test_bench_rbd_section_reports_snapshot_incrementals() -> None:
    """An RBD disk's full and incremental through RBD snapshots beside a loop LUN's through
    QEMU's bitmap (needs the lab's Ceph); the image and the domain are gone afterwards."""
    from tools import cephkit

    why = cephkit.unavailable()
    if why is not None:
        pytest.skip(why)
    proc = _bench("--size-mib", "64", "--repeat", "1", "--settle", "0", "--sections", "rbd",
                  "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    _positive_numbers(doc, ("rbd_full_s", "rbd_inc_s", "rbd_inc_ratio_to_full",
                            "rbd_loop_full_s", "rbd_loop_inc_s", "rbd_inc_ratio_vs_loop_inc",
                            "rbd_inc_stored_bytes"))
    assert doc["rbd_inc_level"] == "incremental", doc
    # only the rewritten extents, as the cluster reports them, and as QEMU's bitmap does
    assert doc["rbd_inc_bytes_transferred"] == doc["rbd_dirty_bytes"] == 10 * 64 * KiB, doc
    assert doc["rbd_loop_inc_bytes_transferred"] == doc["rbd_dirty_bytes"], doc
    assert doc["rbd_verified_identical"] is True, doc
    assert doc["rbd_data_bytes"] == 64 * MiB, doc  # the whole disk holds data
    # the sparse layout as context: the same rewrites, only they stored
    _positive_numbers(doc, ("rbd_sparse_full_s", "rbd_sparse_inc_s",
                            "rbd_sparse_inc_ratio_to_full"))
    assert doc["rbd_sparse_data_bytes"] == 16 * MiB, doc
    assert doc["rbd_sparse_inc_bytes_transferred"] == doc["rbd_dirty_bytes"], doc
    assert doc["rbd_sparse_verified_identical"] is True, doc
    assert set(doc["goals"]) == {"rbd_inc_ratio_to_full", "rbd_inc_stored_ratio_to_dirty"}
    assert not [n for n in _virsh_names() if "rdmb-bench-rbd" in n]
    # "copying FILE into POOL/IMAGE", once per layout
    images = [part.split()[0] for part in proc.stderr.split(f" into {cephkit.POOL}/")[1:]]
    assert len(images) == 2, proc.stderr
    import rbd

    with cephkit.ioctx() as ctx:
        left = rbd.RBD().list(ctx)
        assert all(image.startswith("rdmb-") and image not in left for image in images)
    assert not Path(doc["workdir"]).exists()


def test_bench_atrest_section_reports_compressed_and_encrypted_fulls() -> None:
    """Compressed (zstd, zlib) and encrypted fulls of a LUN of text against a plain full and
    zstd -T0: every one restores the LUN's bytes; the LUN, its domain and key are gone."""
    proc = _bench("--size-mib", "64", "--repeat", "1", "--settle", "0", "--sections", "atrest",
                  "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    _positive_numbers(doc, ("atrest_plain_s", "atrest_zstd_s", "atrest_zlib_s",
                            "atrest_encrypted_s", "atrest_zstd_cli_s",
                            "atrest_plain_stored_bytes", "atrest_zstd_stored_bytes",
                            "atrest_zlib_stored_bytes", "atrest_encrypted_stored_bytes",
                            "atrest_zstd_cli_stored_bytes", "atrest_encrypted_ratio_to_plain",
                            "atrest_zstd_stored_ratio_vs_zstd_cli"))
    assert doc["atrest_data_bytes"] == doc["data_bytes"] == 16 * MiB, doc
    assert doc["atrest_verified_identical"] is True, doc
    assert len(doc["atrest_verified"]) == 5, doc
    for kind in ("zstd", "zlib", "zstd_cli"):
        assert doc[f"atrest_{kind}_stored_bytes"] < doc["atrest_plain_stored_bytes"], doc
    # the encrypted layer holds every byte of the data, plus the LUKS header
    assert doc["atrest_encrypted_stored_bytes"] > doc["atrest_data_bytes"], doc
    assert set(doc["goals"]) == {"atrest_encrypted_ratio_to_plain"}
    assert not [n for n in _virsh_names() if "rdmb-bench-atrest" in n]
    assert not Path(doc["workdir"]).exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert doc["workdir"] not in loops.stdout


def test_bench_rejects_unknown_section() -> None:
    proc = _bench("--sections", "full,bogus", timeout=30)
    assert proc.returncode == 2
    assert "bogus" in proc.stderr
