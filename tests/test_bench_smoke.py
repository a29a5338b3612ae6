"""Smoke test of tools/bench.py on a small LUN: it runs, cleans up and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[1]
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


def test_bench_small_lun_reports_all_numbers() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"),
         "--size-mib", "64", "--repeat", "1", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: only the JSON line on stdout
    doc = json.loads(lines[0])
    for key in KEYS:
        value = doc.get(key)
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)
    assert doc["lun_bytes"] == 64 * 1024 * 1024
    assert doc["data_bytes"] == 16 * 1024 * 1024  # --fill 0.25 by default
    # zeros take no space: the stored backup is about the size of the data, not of the LUN
    assert 0.9 <= doc["stored_ratio_to_data"] <= 1.5, doc
    assert all(doc["verified_identical"].values()), doc["verified_identical"]
    # nothing the bench made is left behind: its directory, loop device and domain are gone
    assert "rdmb" in doc["workdir"] and "rdmb" in doc["domain"]
    assert not Path(doc["workdir"]).exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert doc["workdir"] not in loops.stdout
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                             capture_output=True, text=True, check=True)
    assert doc["domain"] not in domains.stdout.split()
