"""Smoke test of tools/bench.py on a small LUN: it runs, cleans up and reports sane numbers."""

from __future__ import annotations

import json
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
)
PEER_KEYS = (
    "virtnbdbackup_full_s",
    "virtnbdbackup_inc_s",
    "ratio_inc_vs_virtnbdbackup_inc",
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


def test_bench_small_lun_reports_all_numbers() -> None:
    # the peer section needs Debian's virtnbdbackup (tools/lab.sh installs it)
    peer = shutil.which("virtnbdbackup") is not None
    sections = "full,incremental,peer,resync" if peer else "full,incremental,resync"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"),
         "--size-mib", "64", "--repeat", "1", "--sections", sections, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: only the JSON line on stdout
    doc = json.loads(lines[0])
    _positive_numbers(doc, KEYS + INCREMENTAL_KEYS + (PEER_KEYS if peer else ()))
    assert doc["lun_bytes"] == 64 * MiB
    assert doc["data_bytes"] == 16 * MiB  # --fill 0.25 by default
    # zeros take no space: the stored backup is about the size of the data, not of the LUN
    assert 0.9 <= doc["stored_ratio_to_data"] <= 1.5, doc
    assert all(doc["verified_identical"].values()), doc["verified_identical"]

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

    # nothing the bench made is left behind: its directory, loop device and domains are gone
    assert "rdmb" in doc["workdir"] and "rdmb" in doc["domain"]
    assert not Path(doc["workdir"]).exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert doc["workdir"] not in loops.stdout
    names = _virsh_names()
    assert doc["domain"] not in names
    if peer:
        assert "rdmb" in doc["peer_domain"] and doc["peer_domain"] not in names


def test_bench_rejects_unknown_section() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--sections", "full,bogus"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bogus" in proc.stderr
