"""Faults: a damaged repository (truncated manifest, deleted or flipped layer) and a killed restore.

Each damage test builds a chain (full + 2 incrementals) with reference copies of the source
at every point, damages one point, and checks that ``list``, ``verify`` and ``restore`` refuse
the damaged points with one line and exit 5 while every undamaged point still restores
byte-identical, and that the next backup recovers: an explicit incremental on the broken
point is refused, ``auto`` builds on the last usable point (with the reason) and keeps the
dirty tracking, so the backup after it is an incremental again.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.targets.volume_format import (
    DAMAGE_AREA,
    DAMAGE_MAGIC,
    DAMAGE_OFFSET,
    SLOT,
    damage_from_bytes,
)
from tests.lab.volume_server import VolumeServer
from tests.oracles import is_unfinished, newest_superblock
from tools.labkit import LabVM, MiB, guest_write, lab_vm, loop_device, same_bytes, snapshot_source

pytestmark = [pytest.mark.lab, pytest.mark.fault]
EXE = Path(sys.executable).parent / "rdm-backup"
DISK_SIZE = 256 * MiB
LUN_SIZE = 16 * MiB
DISKS = ("vdb", "sda")


@dataclass
class Point:
    """A published backup and the raw copies of its disks taken at its point in time."""

    backup_id: str
    refs: dict[str, Path]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def refused(proc: subprocess.CompletedProcess[str], *names: str) -> None:
    """Exit 5, one stderr line naming every one of ``names``, no traceback."""
    assert proc.returncode == 5, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert name in proc.stderr, (name, proc.stderr)


def back_up(vm: LabVM, repo: str, work: Path, step: int, level: str = "auto"
            ) -> tuple[Point, dict[str, dict[str, Any]]]:
    """Write to both disks, keep reference copies (guest held still), back up."""
    guest_write(vm.dom, "vdb", 0x30 + step, step * 8 * MiB + 64 * 1024, 3 * MiB)
    guest_write(vm.dom, "vdb", 0x60 + step, DISK_SIZE - (step + 1) * 5 * MiB, 256 * 1024)
    guest_write(vm.dom, "sda", 0x90 + step, step * MiB, 128 * 1024)
    vm.dom.suspend()
    try:
        refs = snapshot_source(vm, work / f"ref{step}")
    finally:
        vm.dom.resume()
    doc = api.backup(vm.name, repo, level=level).to_dict()
    return Point(doc["backup_id"], refs), {d["disk"]: d for d in doc["disks"]}


def make_chain(vm: LabVM, repo: str) -> list[Point]:
    """A full backup and two incrementals of both disks."""
    points = []
    for step, level in enumerate(("full", "incremental", "incremental")):
        point, disks = back_up(vm, repo, vm.workdir, step, level)
        assert disks["vdb"]["level"] == level
        points.append(point)
    return points


def prefilled(path: Path) -> str:
    """A restore target of the disk's size holding a pattern; returns its digest."""
    with open(path, "wb") as stream:
        stream.truncate(DISK_SIZE)
        for offset in range(0, DISK_SIZE, 32 * MiB):
            stream.seek(offset)
            stream.write(b"\xa5" * MiB)
    return digest(path)


def digest(path: Path | str) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def restore(vm: LabVM, repo: str, disk: str, to: Path | str,
            backup_id: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--backup", backup_id] if backup_id else []
    return cli("restore", vm.name, "--target", repo, "--disk", disk, "--to", str(to), *extra)


def restore_refused(vm: LabVM, repo: str, disk: str, backup_id: str | None,
                    *names: str) -> None:
    """The restore exits 5 naming ``names`` and leaves its target as it was."""
    target = vm.workdir / "target.raw"
    before = prefilled(target)
    refused(restore(vm, repo, disk, target, backup_id), *names)
    assert digest(target) == before, "a refused restore wrote to its target"
    target.unlink()


def restores_identically(vm: LabVM, repo: str, point: Point, disk: str) -> None:
    out = vm.workdir / f"out-{point.backup_id}-{disk}.raw"
    api.restore(vm.name, repo, disk, str(out), point.backup_id)
    assert same_bytes(out, point.refs[disk]), f"{point.backup_id} {disk} differs"
    out.unlink()


def backup_ids(repo: str) -> list[str]:
    return [m.backup_id for m in api.list_backups(repo)]


def recover(vm: LabVM, repo: str, points: list[Point], broken: str, parent: str,
            unusable: set[tuple[str, str]]) -> None:
    """The next backups after a damage: refused on the broken point, recovered with ``auto``.

    ``broken``: the chain's newest point of vdb, which is unusable; ``parent``: the last
    usable point of vdb that ``auto`` must build on; ``unusable``: (backup, disk) pairs
    that must not restore. Every other point restores byte-identical afterwards.
    """
    published = backup_ids(repo)
    guest_write(vm.dom, "vdb", 0x7e, 100 * MiB, MiB)
    proc = cli("backup", vm.name, "--target", repo, "--level", "incremental")
    refused(proc, broken, "vdb")
    assert backup_ids(repo) == published, "a refused backup published a point"

    fourth, disks = back_up(vm, repo, vm.workdir, 3)  # --level auto
    vdb = disks["vdb"]
    assert vdb["parent"] == parent and vdb["level"] in ("incremental", "differential"), vdb
    assert broken in vdb["reason"], vdb["reason"]  # says why it did not build on it
    fifth, disks = back_up(vm, repo, vm.workdir, 4)
    assert disks["vdb"]["level"] == "incremental", disks["vdb"]
    assert disks["vdb"]["parent"] == fourth.backup_id

    for point in [*points, fourth, fifth]:
        for disk in DISKS:
            if (point.backup_id, disk) not in unusable:
                restores_identically(vm, repo, point, disk)
    for point in (fourth, fifth):
        assert api.verify(repo, vm.name, point.backup_id).ok


def test_truncated_manifest_of_a_middle_backup() -> None:
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        repo = str(vm.workdir / "repo")
        first, second, third = points = make_chain(vm, repo)
        manifest = Path(repo) / vm.uuid / second.backup_id / "manifest.json"
        os.truncate(manifest, manifest.stat().st_size // 2)

        # list shows the readable points and names the damaged one in one line
        proc = cli("list", "--target", repo)
        refused(proc, second.backup_id)
        listed = [line.split()[0] for line in proc.stdout.splitlines()]
        assert listed == [first.backup_id, third.backup_id], proc.stdout
        proc = cli("list", vm.name, "--target", repo, "--json")
        refused(proc, second.backup_id)
        assert [b["backup_id"] for b in json.loads(proc.stdout)] == listed

        refused(cli("verify", "--target", repo), second.backup_id)
        refused(cli("verify", vm.name, "--target", repo, "--backup", second.backup_id),
                second.backup_id)
        proc = cli("verify", vm.name, "--target", repo, "--backup", third.backup_id)
        refused(proc, third.backup_id, "vdb", second.backup_id)

        restore_refused(vm, repo, "vdb", second.backup_id, second.backup_id)
        restore_refused(vm, repo, "sda", second.backup_id, second.backup_id)
        restore_refused(vm, repo, "vdb", third.backup_id, third.backup_id, "vdb",
                        second.backup_id)
        restore_refused(vm, repo, "vdb", None, third.backup_id, "vdb")  # the newest
        for disk in DISKS:
            restores_identically(vm, repo, first, disk)

        recover(vm, repo, points, broken=third.backup_id, parent=first.backup_id,
                unusable={(second.backup_id, "vdb"), (second.backup_id, "sda"),
                          (third.backup_id, "vdb")})


def test_data_file_deleted_in_the_middle_of_a_chain() -> None:
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        repo = str(vm.workdir / "repo")
        first, second, third = points = make_chain(vm, repo)
        (Path(repo) / vm.uuid / second.backup_id / "vdb.qcow2").unlink()

        proc = cli("verify", "--target", repo)
        refused(proc, f"backup {second.backup_id} disk vdb")
        report = json.loads(cli("verify", "--target", repo, "--json").stdout)
        assert {(d["backup_id"], d["disk"]) for d in report["disks"] if not d["ok"]} == {
            (second.backup_id, "vdb"), (third.backup_id, "vdb")}

        restore_refused(vm, repo, "vdb", third.backup_id, third.backup_id, "vdb",
                        second.backup_id)
        restore_refused(vm, repo, "vdb", second.backup_id, second.backup_id, "vdb")
        for disk in DISKS:
            restores_identically(vm, repo, first, disk)

        recover(vm, repo, points, broken=third.backup_id, parent=first.backup_id,
                unusable={(second.backup_id, "vdb"), (third.backup_id, "vdb")})


def flip_data_byte(layer: Path, region: tuple[int, int] | None = None) -> None:
    """Flip one byte of guest data stored in a qcow2 layer (not of its metadata).

    ``region``: the layer is the ``(offset, length)`` region of the file ``layer``.
    """
    base, length = region or (0, layer.stat().st_size)
    node = {"driver": "qcow2", "backing": None,
            "file": {"driver": "raw", "offset": base, "size": length,
                     "file": {"driver": "file", "filename": str(layer)}}}
    extents = json.loads(subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", "json:" + json.dumps(node)],
        capture_output=True, text=True, check=True).stdout)
    own = next(e for e in extents if e["data"] and e["depth"] == 0 and "offset" in e)
    with open(layer, "r+b") as stream:
        stream.seek(base + own["offset"] + 4097)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0x01]))


def test_flipped_byte_in_an_incremental() -> None:
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        repo = str(vm.workdir / "repo")
        first, second, third = points = make_chain(vm, repo)
        flip_data_byte(Path(repo) / vm.uuid / third.backup_id / "vdb.qcow2")

        refused(cli("verify", "--target", repo), f"backup {third.backup_id} disk vdb")
        restore_refused(vm, repo, "vdb", third.backup_id, third.backup_id, "vdb")
        restore_refused(vm, repo, "vdb", None, third.backup_id, "vdb")
        for disk in DISKS:
            restores_identically(vm, repo, second, disk)

        # vdb of the second point has no dirty bitmap any more: the recovery builds on
        # the full, whose bitmap holds every write since
        recover(vm, repo, points, broken=third.backup_id, parent=first.backup_id,
                unusable={(third.backup_id, "vdb")})


def volume_entry(volume: Path, backup_id: str) -> dict[str, Any]:
    """The table-of-contents entry of a backup in a volume file (newest valid superblock)."""
    with open(volume, "rb") as stream:
        newest = newest_superblock(stream.read(SLOT), stream.read(SLOT))
    assert newest is not None
    return next(e for e in newest.entries if e["backup_id"] == backup_id)


def volume_damage(volume: Path) -> dict[str, dict[str, str]]:
    """The damage record of a volume file (``{backup id: {disk: problem}}``)."""
    with open(volume, "rb") as stream:
        stream.seek(DAMAGE_OFFSET)
        data = stream.read(DAMAGE_AREA)
    assert data.startswith(DAMAGE_MAGIC), data[:64]
    return damage_from_bytes(data)


def test_flipped_byte_and_malformed_manifest_in_an_nbd_volume() -> None:
    """The same damage in a volume: found, remembered for the next backup, refused by name."""
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        server = VolumeServer(vm.workdir / "volume.img")
        server.start()
        try:
            repo = server.uri
            first, second, third = points = make_chain(vm, repo)
            manifest = next(m for m in api.list_backups(repo) if m.backup_id == third.backup_id)
            location = manifest.disk("vdb").location  # type: ignore[union-attr]
            assert location is not None
            flip_data_byte(server.path, (int(location["offset"]), int(location["region"])))

            refused(cli("verify", "--target", repo), f"backup {third.backup_id} disk vdb")
            assert "vdb" in volume_damage(server.path)[third.backup_id]  # remembered
            restore_refused(vm, repo, "vdb", third.backup_id, third.backup_id, "vdb")
            for disk in DISKS:
                restores_identically(vm, repo, second, disk)
            recover(vm, repo, points, broken=third.backup_id, parent=first.backup_id,
                    unusable={(third.backup_id, "vdb")})

            # a manifest overwritten in the volume: named, exit 5; the rest still restores
            offset, _length = volume_entry(server.path, second.backup_id)["manifest"]
            with open(server.path, "r+b") as stream:
                stream.seek(offset)
                stream.write(b"#")
            proc = cli("list", vm.name, "--target", repo)
            refused(proc, second.backup_id)
            assert second.backup_id not in proc.stdout and first.backup_id in proc.stdout
            refused(cli("verify", "--target", repo), second.backup_id)
            restore_refused(vm, repo, "vdb", second.backup_id, second.backup_id)
            for disk in DISKS:
                restores_identically(vm, repo, first, disk)
        finally:
            server.stop()


# -- SIGKILL during a restore ---------------------------------------------------------------

BIG_DISK = 512 * MiB


@dataclass
class BigBackup:
    """A VM whose vdb holds a lot of data, its repository and a raw copy of vdb."""

    vm: LabVM
    repo: str
    ref: Path


@pytest.fixture(scope="module")
def big_backup() -> Iterator[BigBackup]:
    """A 512 MiB loop LUN with 384 MiB of data written in pieces, backed up in full."""
    with lab_vm(loop_size=BIG_DISK, lun_size=LUN_SIZE) as vm:
        for index in range(48):
            guest_write(vm.dom, "vdb", 0x20 + index, index * 10 * MiB, 8 * MiB)
        vm.dom.suspend()
        try:
            ref = snapshot_source(vm, vm.workdir / "ref")["vdb"]
        finally:
            vm.dom.resume()
        repo = str(vm.workdir / "repo")
        api.backup(vm.name, repo, disks=["vdb"], level="full")
        yield BigBackup(vm, repo, ref)


def tree(path: Path | str) -> set[str]:
    """Every path below ``path``, relative."""
    found = set()
    for root, dirs, files in os.walk(path):
        found |= {os.path.relpath(os.path.join(root, n), path) for n in dirs + files}
    return found


def children(pid: int) -> set[int]:
    """The pids of a process's children (all its threads')."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def written(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    except OSError:
        return 0
    return next(int(line.split()[1]) for line in lines if line.startswith("wchar:"))


PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans(on: bool) -> None:
    """Become (or stop being) the parent of orphaned descendants, to learn how they ended."""
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def reap(pids: set[int], timeout: float) -> dict[int, int | None]:
    """Wait status of each adopted pid, None for those still running after ``timeout``."""
    status: dict[int, int | None] = dict.fromkeys(pids)
    deadline = time.monotonic() + timeout
    while any(v is None for v in status.values()) and time.monotonic() < deadline:
        for pid in [p for p, v in status.items() if v is None]:
            try:
                done, code = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                status[pid] = -1  # not ours: gone before it was adopted
                continue
            if done:
                status[pid] = code
        time.sleep(0.005)
    return status


@pytest.mark.parametrize("kind", ["block_device", "file", "new_file"])
def test_restore_killed_while_writing(big_backup: BigBackup, kind: str) -> None:
    vm, repo = big_backup.vm, big_backup.repo
    work = vm.workdir / f"kill-{kind}"
    work.mkdir()
    target_file = work / "target.img"
    if kind != "new_file":
        with open(target_file, "wb") as stream:
            stream.truncate(BIG_DISK)
    with (loop_device(target_file) if kind == "block_device"
          else contextlib.nullcontext(str(target_file))) as to:
        repo_before, work_before = tree(repo), tree(work)
        adopt_orphans(True)
        proc = subprocess.Popen([str(EXE), "restore", vm.name, "--target", repo, "--disk",
                                 "vdb", "--to", to], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        kids: set[int] = set()
        ended: dict[int, int | None] = {}
        try:
            # kill it once its copy (a qemu-storage-daemon) has written 64 MiB of the 384 MiB
            deadline = time.monotonic() + 60
            writer = None
            while writer is None or written(writer) < 64 * MiB:
                assert proc.poll() is None, ("the restore ended before it was killed",
                                             proc.communicate())
                assert time.monotonic() < deadline, "the restore did not start writing"
                writer = next((c for c in children(proc.pid)
                               if (cmdline(c) or [""])[0].endswith("qemu-storage-daemon")),
                              None)
                time.sleep(0.002)
            kids = children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            # its children die with it (killed, not run to their end): nothing keeps
            # writing to the target behind the next run's back
            ended = reap(kids, 10)
        finally:
            adopt_orphans(False)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in kids:  # whatever survived: killed by pid, then reaped
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        assert writer in kids
        outlived = {pid: code for pid, code in ended.items()
                    if code is None or (code != -1 and not os.WIFSIGNALED(code))}
        assert not outlived, f"children outlived the killed restore: {outlived}"

        assert tree(repo) == repo_before, "the killed restore left files in the repository"
        if kind == "new_file":
            # a new file appears whole or not at all: nothing under its name yet, and
            # the hidden partial file of the killed run goes with the next run
            assert not target_file.exists(), "a half-written file carries the target's name"
            assert [is_unfinished(name) for name in tree(work)] == [True], tree(work)
        else:
            assert tree(work) == work_before, "the killed restore left files beside its target"
        again = cli("restore", vm.name, "--target", repo, "--disk", "vdb", "--to", to)
        assert again.returncode == 0, again.stderr
        assert same_bytes(to, big_backup.ref)
        assert tree(work) == {"target.img"}
        proc2 = cli("verify", "--target", repo)
        assert proc2.returncode == 0, proc2.stderr

