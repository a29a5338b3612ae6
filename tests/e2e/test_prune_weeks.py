"""Retention over weeks: 32 points of every level on 40 days of the tool's clock
(libfaketime, per process), then ``prune --keep-last 3 --keep-daily 7 --keep-weekly 4``.

The kept set is what an independent implementation of the rules picks (plus the newest
full copy, which the next differential builds on); every kept point restores byte-identical
to the disk as it was when it was made; ``verify`` is clean; the repository gave back the
dropped points' data that no kept point needed; the next incremental builds on the kept
bitmap.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.test_prune import (
    allocated,
    listed,
    next_incremental,
    sha256,
    verified_and_restored,
)
from tests.e2e.test_prune_dry_run import FAKETIME, rdm_backup
from tests.unit.test_retention import reference
from tools.labkit import MiB, guest_write, lab_vm

pytestmark = pytest.mark.lab
START = datetime(2026, 10, 1, 9, 30, tzinfo=UTC)
RULES = {"last": 3, "daily": 7, "weekly": 4}
KiB = 1024


def schedule() -> list[tuple[str, datetime]]:
    """32 points: mostly one a day, some days two, some days none; a full every ten."""
    points = []
    day = 0
    for n in range(32):
        day += 2 if n % 6 == 5 else (0 if n % 4 == 3 else 1)
        when = START + timedelta(days=day, hours=n % 3 * 5)
        level = ("full" if n % 10 == 0 else "differential" if n % 7 == 3
                 else "resync" if n % 9 == 4 else "incremental")
        points.append((level, when))
    return points


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_weeks_of_points_pruned_by_the_rules() -> None:
    with lab_vm(loop_size=16 * MiB, lun_size=16 * MiB) as vm:
        repo = vm.workdir / "repo"
        made: dict[str, str] = {}
        times: list[tuple[str, datetime]] = []
        fulls: list[str] = []
        for n, (level, when) in enumerate(schedule()):
            guest_write(vm.dom, "vdb", 0x30 + n, (n * 448 * KiB) % (15 * MiB), 256 * KiB)
            reference_digest = sha256(vm.loop)
            proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb",
                              "--level", level, "--json",
                              date=when.strftime("%Y-%m-%d %H:%M:%S"))
            assert proc.returncode == 0, proc.stderr
            document = json.loads(proc.stdout)
            assert document["level"] == level
            made[document["backup_id"]] = reference_digest
            times.append((document["backup_id"], when))
            if level == "full":
                fulls.append(document["backup_id"])
        picked = {b for b, why in reference(times, RULES).items() if why}
        expected = [b for b in made if b in picked or b == fulls[-1]]
        layers_before = {b: allocated(repo / vm.uuid / b) for b in made}
        before = allocated(repo)

        proc = rdm_backup("prune", vm.name, "--target", str(repo), "--keep-last", "3",
                          "--keep-daily", "7", "--keep-weekly", "4", "--json")
        assert proc.returncode == 0, proc.stderr
        [chain] = json.loads(proc.stdout)
        assert listed(repo, vm.name) == expected
        assert chain["dropped"] == [b for b in made if b not in expected]
        unique = sum(layers_before[b] for b in chain["dropped"]) - chain["bytes_moved"]
        assert before - allocated(repo) >= unique - 512 * KiB * len(chain["merges"])

        verified_and_restored(vm, repo, {i: made[i] for i in expected})
        next_incremental(vm, repo, 3 * MiB)
