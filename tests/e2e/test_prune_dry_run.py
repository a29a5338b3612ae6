"""``prune --dry-run`` on a repository made by real backups taken on different days.

Each backup runs the CLI under libfaketime with its own date, so the points' ``created``
times span four days; the dry run keeps what the rules and the protections say, in text
and JSON, and the repository is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.labkit import LabVM, MiB, guest_write, lab_vm

pytestmark = pytest.mark.lab
EXE = Path(sys.executable).parent / "rdm-backup"
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
DATES = ["2026-11-28 10:00:00", "2026-11-29 09:00:00", "2026-11-29 10:00:00",
         "2026-11-30 23:59:00", None]  # None: the real clock


def rdm_backup(*args: str, date: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if date is not None:
        env.update(LD_PRELOAD=str(FAKETIME), FAKETIME=f"@{date}")
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=600,
                          env=env, check=False)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def backups_on_four_days(vm: LabVM, repo: Path) -> list[str]:
    ids = []
    for n, date in enumerate(DATES):
        guest_write(vm.dom, "vdb", 0x30 + n, n * MiB, MiB)
        proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb", "--json",
                          date=date)
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        if date is not None:
            assert document["created"].startswith(date[:10].replace(" ", "T"))
        ids.append(document["backup_id"])
    return ids


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_a_dry_run_on_backups_of_four_days() -> None:
    with lab_vm(loop_size=64 * MiB, lun_size=16 * MiB) as vm:
        repo = vm.workdir / "repo"
        ids = backups_on_four_days(vm, repo)
        before = tree(repo)
        rules = ["--keep-last", "1", "--keep-daily", "2"]
        proc = rdm_backup("prune", vm.name, "--target", str(repo), *rules, "--dry-run",
                          "--json")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        [chain] = json.loads(proc.stdout)
        assert (chain["domain_uuid"], chain["domain_name"], chain["chain"]) == (
            vm.uuid, vm.name, "default")
        assert [(p["backup_id"], p["level"], p["action"], p["rule"], p["protected"])
                for p in chain["points"]] == [
            (ids[0], "full", "keep", None, "next differential of vdb builds on it"),
            (ids[1], "incremental", "drop", None, None),
            (ids[2], "incremental", "keep", "daily 2", None),
            (ids[3], "incremental", "keep", "daily 1", None),
            (ids[4], "incremental", "keep", "last 1",
             "newest of chain; next incremental of vdb builds on it")]

        proc = rdm_backup("prune", "--all", "--target", str(repo), *rules, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == f"chain default of {vm.name} ({vm.uuid}): keep 4, drop 1"
        assert [line.split()[:2] for line in lines[1:]] == [
            ["keep", ids[0]], ["drop", ids[1]], ["keep", ids[2]], ["keep", ids[3]],
            ["keep", ids[4]]]
        assert lines[3].endswith("daily 2") and lines[5].endswith(
            "last 1, protected: newest of chain; next incremental of vdb builds on it")

        assert tree(repo) == before
