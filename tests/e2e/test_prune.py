"""``prune`` on a repository of real backups of every level, made on different days.

Each backup runs the CLI under libfaketime with its own date. The prune keeps exactly
what its dry run said; every kept point restores byte-identical to the disk as it was
when the point was made (its sha256 taken then); ``verify`` is clean; the repository
gave space back; the next incremental builds on the kept bitmap and restores.
A second test kills the prune (SIGKILL) at each of its steps, on fresh copies of the
same repository: every kept point still restores, and the next command finishes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.qemu import layers
from tests.e2e.test_prune_dry_run import EXE, FAKETIME, rdm_backup
from tools.labkit import LabVM, MiB, guest_write, lab_vm

pytestmark = pytest.mark.lab
# (level, date): fulls, incrementals, a differential and a resync over five days
POINTS = [("full", "2026-11-01 10:00:00"), ("incremental", "2026-11-01 11:00:00"),
          ("incremental", "2026-11-02 10:00:00"), ("incremental", "2026-11-02 12:00:00"),
          ("full", "2026-11-03 10:00:00"), ("differential", "2026-11-03 12:00:00"),
          ("incremental", "2026-11-04 10:00:00"), ("resync", "2026-11-04 12:00:00"),
          ("incremental", "2026-11-05 10:00:00")]
# a dropped full under two kept branches (incrementals, and a differential's)
BRANCHES = [("full", "2026-11-01 10:00:00"), ("incremental", "2026-11-01 11:00:00"),
            ("incremental", "2026-11-02 10:00:00"), ("differential", "2026-11-03 10:00:00"),
            ("incremental", "2026-11-03 12:00:00"), ("full", "2026-11-04 10:00:00"),
            ("incremental", "2026-11-05 10:00:00"), ("resync", "2026-11-05 12:00:00"),
            ("incremental", "2026-11-06 10:00:00")]
RULES = ["--keep-last", "2", "--keep-daily", "3"]


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def make_points(vm: LabVM, repo: Path, points: list[tuple[str, str]] = POINTS
                ) -> dict[str, str]:
    """The backups of ``points``, each after guest writes; backup id -> sha256 of vdb then."""
    made: dict[str, str] = {}
    for n, (level, date) in enumerate(points):
        length = 8 * MiB if n == 0 else MiB  # a large first full: dropping it merges down
        guest_write(vm.dom, "vdb", 0x40 + n, (n % 5) * 3 * MiB + n * 64 * 1024, length)
        reference = sha256(vm.loop)
        proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb",
                          "--level", level, "--json", date=date)
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        assert document["level"] == level
        made[document["backup_id"]] = reference
    return made


def dry_run(repo: Path, name: str) -> dict[str, str]:
    proc = rdm_backup("prune", name, "--target", str(repo), *RULES, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    [chain] = json.loads(proc.stdout)
    return {p["backup_id"]: p["action"] for p in chain["points"]}


def listed(repo: Path, name: str) -> list[str]:
    proc = rdm_backup("list", name, "--target", str(repo), "--json")
    assert proc.returncode == 0, proc.stderr
    return [b["backup_id"] for b in json.loads(proc.stdout)]


def restored_digest(repo: Path, name: str, backup_id: str, scratch: Path) -> str:
    """sha256 of vdb as restored from the point (the Python API: what the command calls)."""
    out = scratch / f"{backup_id}.raw"
    api.restore(name, str(repo), "vdb", str(out), backup_id=backup_id)
    try:
        return sha256(out)
    finally:
        out.unlink()


def verified_and_restored(vm: LabVM, repo: Path, points: dict[str, str]) -> None:
    """``verify`` is clean, and each point restores to its sha256 (backup id -> sha256)."""
    proc = rdm_backup("verify", vm.name, "--target", str(repo))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for backup_id, digest in points.items():
        assert restored_digest(repo, vm.name, backup_id, vm.workdir) == digest


def next_incremental(vm: LabVM, repo: Path, offset: int) -> dict[str, object]:
    """A guest write at ``offset``, then a backup: an incremental that restores to the disk
    as it is; its ``--json`` document."""
    guest_write(vm.dom, "vdb", 0x7E, offset, MiB)
    reference = sha256(vm.loop)
    proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb", "--json")
    assert proc.returncode == 0, proc.stderr
    document: dict[str, object] = json.loads(proc.stdout)
    assert document["level"] == "incremental"
    assert restored_digest(repo, vm.name, str(document["backup_id"]), vm.workdir) == reference
    return document


def allocated(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_a_full_under_two_kept_branches_is_kept_once() -> None:
    """The dropped full goes into the older branch's kept point; the other branch's kept
    point is rebased onto it, so the repository still shrinks."""
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm:
        repo = vm.workdir / "repo"
        made = make_points(vm, repo, BRANCHES)
        decided = dry_run(repo, vm.name)
        kept = [i for i in made if decided[i] == "keep"]
        before = allocated(repo)
        proc = rdm_backup("prune", vm.name, "--target", str(repo), *RULES, "--json")
        assert proc.returncode == 0, proc.stderr
        [chain] = json.loads(proc.stdout)
        directions = [m["direction"] for m in chain["merges"]]
        assert "rebase" in directions, chain["merges"]
        assert listed(repo, vm.name) == kept
        assert allocated(repo) < before
        verified_and_restored(vm, repo, {i: made[i] for i in kept})


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_prune_keeps_what_the_rules_say_and_every_kept_point_restores() -> None:
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm:
        repo = vm.workdir / "repo"
        made = make_points(vm, repo)
        decided = dry_run(repo, vm.name)
        kept = [i for i in made if decided[i] == "keep"]
        dropped = [i for i in made if decided[i] == "drop"]
        assert dropped and len(kept) >= 3
        before = allocated(repo)

        proc = rdm_backup("prune", vm.name, "--target", str(repo), *RULES, "--json")
        assert proc.returncode == 0, proc.stderr
        [chain] = json.loads(proc.stdout)
        assert chain["dropped"] == dropped
        assert {m["direction"] for m in chain["merges"]} == {"up", "down"}
        assert chain["bytes_moved"] == sum(m["bytes_moved"] for m in chain["merges"])
        assert listed(repo, vm.name) == kept
        assert before - allocated(repo) >= chain["freed_bytes"] > 0
        proc = rdm_backup("list", vm.name, "--target", str(repo), "--json")
        parents = [b["parent"] for b in json.loads(proc.stdout)]
        assert all(p is None or p in kept for p in parents), parents  # no dropped id named

        verified_and_restored(vm, repo, {i: made[i] for i in kept})
        assert next_incremental(vm, repo, 5 * MiB)["pruned"] is None

        guest_write(vm.dom, "vdb", 0x7F, 9 * MiB, MiB)
        reference = sha256(vm.loop)
        before_ids = listed(repo, vm.name)
        proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb", "--json",
                          "--prune", "--keep-last", "1")
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        pruned = document["pruned"]["dropped"]
        assert pruned and document["backup_id"] not in pruned
        assert listed(repo, vm.name) == [i for i in [*before_ids, document["backup_id"]]
                                         if i not in pruned]
        assert restored_digest(repo, vm.name, document["backup_id"], vm.workdir) == reference


def _kill_when(argv: list[str], ready: Callable[[int], bool], limit: float = 60.0) -> bool:
    """Run ``argv`` and SIGKILL it once ``ready(pid)`` holds; False when it ended first."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + limit
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(proc.pid):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
@pytest.mark.parametrize("points", [POINTS, BRANCHES], ids=["down-and-up", "rebase"])
def test_a_prune_killed_at_each_step_leaves_every_kept_point_restorable(
        points: list[tuple[str, str]]) -> None:
    with lab_vm(loop_size=16 * MiB, lun_size=16 * MiB) as vm:
        pristine = vm.workdir / "pristine"
        made = make_points(vm, pristine, points)
        decided = dry_run(pristine, vm.name)
        kept = [i for i in made if decided[i] == "keep"]
        domain_dir = pristine / vm.uuid
        merged = [i for i in kept if any(  # the kept points whose layers a merge rewrites
            decided.get(d["parent"]) == "drop"
            for d in json.loads((domain_dir / i / "manifest.json").read_text())["disks"])]
        assert merged
        steps: list[tuple[str, Callable[[Path, int], bool]]] = [
            ("journal written", lambda d, _: (d / ".prune-journal.json").exists()),
            ("a merge job running", lambda _, pid: _merging(pid)),
            ("a kept layer's header ahead of its manifest", lambda d, _: _header_ahead(d)),
            ("a kept manifest written again", lambda d, _: _manifest_changed(domain_dir, d)),
            ("a dropped point leaving", lambda d, _: any(d.glob(".pruned-*"))),
            ("a dropped point gone", lambda d, _: len(list(d.glob("2*"))) < len(made)),
        ]
        killed = 0
        for step, seen in steps:
            repo = vm.workdir / "repo"
            shutil.rmtree(repo, ignore_errors=True)
            shutil.copytree(pristine, repo)
            here = repo / vm.uuid
            argv = [str(EXE), "prune", vm.name, "--target", str(repo), *RULES]
            killed += _kill_when(argv, functools.partial(seen, here))
            # verify finishes the prune first, then every kept point checks out; the points
            # whose layers were rewritten also restore to what the disk held
            proc = rdm_backup("verify", vm.name, "--target", str(repo))
            assert proc.returncode == 0, (step, proc.stdout + proc.stderr)
            assert not (here / ".prune-journal.json").exists(), step
            assert listed(repo, vm.name) == kept, step
            for backup_id in merged:
                assert restored_digest(repo, vm.name, backup_id, vm.workdir) == \
                    made[backup_id], step
        assert killed >= 3  # most steps were caught while the prune ran


def _merging(prune: int) -> bool:
    """A merge of the prune ``prune`` (a pid) runs: its QEMU stream or commit job, or a
    rebase (a child of that process, not of another test's)."""
    found = subprocess.run(["pgrep", "-P", str(prune), "-f",
                            "qemu-storage-daemon.*(stream|commit)|qemu-img rebase"],
                           capture_output=True, check=False)
    return found.returncode == 0


def _manifest_changed(original: Path, copy: Path) -> bool:
    for manifest in copy.glob("2*/manifest.json"):
        source = original / manifest.parent.name / "manifest.json"
        try:
            if source.read_bytes() != manifest.read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed")
def test_a_backup_during_a_prune_fails_with_one_line_and_the_prune_completes() -> None:
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm:
        repo = vm.workdir / "repo"
        made = make_points(vm, repo)
        decided = dry_run(repo, vm.name)
        code = ("import sys; from libvirt_rdm_backup import api; "
                "from libvirt_rdm_backup.repository.retention import RetentionPolicy; "
                "api.prune(sys.argv[1], RetentionPolicy(keep_last=2, keep_daily=3), "
                "sys.argv[2], bwlimit=1)")  # 1 MiB/s: the merges take seconds
        prune = subprocess.Popen([sys.executable, "-c", code, str(repo), vm.name])
        try:
            journal = repo / vm.uuid / ".prune-journal.json"
            deadline = time.monotonic() + 60
            while not journal.exists() and prune.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert journal.exists()
            proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb")
            assert proc.returncode == 4
            assert proc.stderr.count("\n") == 1 and "prune" in proc.stderr, proc.stderr
        finally:
            assert prune.wait(timeout=120) == 0
        assert listed(repo, vm.name) == [i for i in made if decided[i] == "keep"]


def _header_ahead(domain: Path) -> bool:
    """A layer whose header names another backing file than its manifest does (a merge
    that ended in QEMU, not yet published)."""
    for manifest in domain.glob("2*/manifest.json"):
        try:
            document = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        for disk in document.get("disks", []):
            layer = manifest.parent / disk["data_file"]
            if layers.file_problem(str(layer), disk.get("backing_file"), disk["size"]):
                return True
    return False

