"""Fault: the wall clock jumps forward and back between backups (libfaketime, tool only).

A full backup taken with the clock a day ahead, an incremental with the right clock,
another with the clock a day behind: ids and ``created`` times say the opposite of the
true order. ``list`` still shows the true order, the newest backup is the last one
taken, each incremental builds on the one before, restore without ``--backup`` restores
the last one, every point restores byte-identical, and the dirty bitmap of the newest
point is the one kept (beside the chain's full, which differentials build on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.repository.manifest import Manifest
from tests.faults.points import Points
from tools.labkit import LabVM, MiB, dirty_bitmaps, fill, lab_vm, same_bytes

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
PIECE = 16 * MiB  # fill() writes piece i at i * 16 MiB with pattern 0x20 + first + i


def backup_with_clock(vm: LabVM, points: Points, offset: str | None, *extra: str
                      ) -> Manifest:
    """A backup by the CLI whose wall clock is ``offset`` off (libfaketime); keeps references."""
    env = dict(os.environ)
    if offset is not None:
        env.update(LD_PRELOAD=str(FAKETIME), FAKETIME=offset)
    refs = points.reference(str(len(points.refs)))
    proc = subprocess.run([str(EXE), "backup", vm.name, "--target", points.repo, "--json",
                           *extra], capture_output=True, text=True, timeout=600, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    backup_id = json.loads(proc.stdout)["backup_id"]
    points.refs[backup_id] = refs
    found = [m for m in api.list_backups(points.repo) if m.backup_id == backup_id]
    assert len(found) == 1
    return found[0]


def written(vm: LabVM, pieces: int, first: int) -> None:
    """The guest's writes of ``fill`` reached vdb (read back from the host, not the HMP reply)."""
    for index in range(pieces):
        data = subprocess.run(["dd", f"if={vm.loop}", "bs=4096", "count=1", "iflag=direct",
                               f"skip={index * PIECE // 4096}", "status=none"],
                              capture_output=True, check=True).stdout
        assert data == bytes([0x20 + (first + index) % 200]) * 4096, f"write {index} is missing"


def seconds_off(manifest: Manifest) -> float:
    """How far the backup's ``created`` is from the real time now (negative: behind)."""
    created = datetime.fromisoformat(manifest.created.replace("Z", "+00:00"))
    return (created - datetime.now(UTC)) / timedelta(seconds=1)


def chain_bitmaps(vm: LabVM, manifests: list[Manifest]) -> set[str]:
    """Which of the backups' vdb bitmaps the running QEMU still has, by backup id."""
    live = dirty_bitmaps(vm.dom)
    found = set()
    for manifest in manifests:
        record = manifest.disk("vdb")
        if record is not None and record.bitmap in live:
            found.add(manifest.backup_id)
    return found


def restored_newest(vm: LabVM, points: Points, backup_id: str) -> None:
    """Restore without ``--backup`` gives the newest point's bytes (that of ``backup_id``)."""
    out = vm.workdir / "newest.raw"
    result = api.restore(vm.name, points.repo, "vdb", str(out))
    assert result.backup_id == backup_id
    assert same_bytes(out, points.refs[backup_id]["vdb"])
    out.unlink()


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_the_clock_jumping_forward_and_back_between_backups() -> None:
    with lab_vm(loop_size=256 * MiB, lun_size=16 * MiB) as vm:
        points = Points(vm, str(vm.workdir / "repo"))
        fill(vm, 4)
        written(vm, 4, 0)
        ahead = backup_with_clock(vm, points, "+1d")
        assert ahead.level == "full" and seconds_off(ahead) > 20 * 3600

        fill(vm, 3, first=50)
        written(vm, 3, 50)
        right = backup_with_clock(vm, points, None, "--level", "incremental")
        assert abs(seconds_off(right)) < 3600 and right.created < ahead.created
        vdb = right.disk("vdb")
        assert vdb is not None and vdb.level == "incremental" and vdb.parent == ahead.backup_id
        # the backup with the right clock is the newest: its bitmap is intact
        assert chain_bitmaps(vm, [ahead, right]) == {ahead.backup_id, right.backup_id}
        assert [m.backup_id for m in api.list_backups(points.repo)] == list(points.refs)
        restored_newest(vm, points, right.backup_id)

        fill(vm, 2, first=90)
        written(vm, 2, 90)
        behind = backup_with_clock(vm, points, "-1d", "--level", "incremental")
        assert seconds_off(behind) < -20 * 3600 and behind.backup_id < ahead.backup_id
        vdb = behind.disk("vdb")
        assert vdb is not None and vdb.level == "incremental" and vdb.parent == right.backup_id
        # the incremental's bitmap is the newest; the one before it is gone, the full's
        # stays for differentials
        assert chain_bitmaps(vm, [ahead, right, behind]) == {ahead.backup_id, behind.backup_id}

        listed = subprocess.run([str(EXE), "list", "--target", points.repo, "--json"],
                                capture_output=True, text=True, timeout=120, check=True)
        assert [(b["backup_id"], b["sequence"]) for b in json.loads(listed.stdout)] == [
            (ahead.backup_id, 1), (right.backup_id, 2), (behind.backup_id, 3)]
        restored_newest(vm, points, behind.backup_id)
        assert points.restore_every_point() == 2 * 3
        state, _reason = vm.dom.state()
        assert state == 1  # VIR_DOMAIN_RUNNING
