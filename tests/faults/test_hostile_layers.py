"""Faults: hostile qcow2 layers in a repository (trust boundary: the layer header).

Someone who can write the repository (or the backup server that holds it) replaces layers
with images whose header names a backing file outside the repository, an external data
file, encryption, or that are not qcow2 at all, and fixes the manifests' digests so that
they match. ``verify``, ``restore`` and ``export`` must refuse each with exit 5 in one line
naming backup and disk, before anything is read: no process ever opens the outside file
(watched with inotify), refused restore targets keep their bytes, and every good point
still restores byte-identical.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.restore import open_target, write_disk
from libvirt_rdm_backup.engine.stores import open_store
from libvirt_rdm_backup.engine.verify import verify_lineage
from libvirt_rdm_backup.qemu.layers import HEADER_READ
from libvirt_rdm_backup.repository.digest import file_digest
from tests.faults.test_repository_damage import (
    DISK_SIZE,
    DISKS,
    LUN_SIZE,
    Point,
    back_up,
    cli,
    make_chain,
    refused,
    restore_refused,
    restores_identically,
)
from tests.lab.volume_server import VolumeServer
from tests.unit.test_qcow2_layers import qemu_img
from tools.labkit import LabVM, lab_vm

pytestmark = pytest.mark.lab
PATTERN = b"OUTSIDE!" * 8192  # 64 KiB of a recognisable pattern
IN_OPEN, IN_ACCESS, IN_NONBLOCK = 0x20, 0x01, 0o4000


class OpenWatch:
    """inotify on one directory: did any process (root included) open or read a file in it?"""

    def __init__(self, directory: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0
        assert self.libc.inotify_add_watch(self.fd, str(directory).encode(),
                                           IN_OPEN | IN_ACCESS) >= 0

    def events(self) -> int:
        """Events seen since the last call."""
        try:
            return len(os.read(self.fd, 65536))
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def outside_file(workdir: Path, name: str = "outside") -> Iterator[tuple[Path, OpenWatch]]:
    """A file outside the repository holding :data:`PATTERN`, alone in a watched directory
    ``name`` (new) under ``workdir``."""
    directory = workdir / name
    directory.mkdir()
    path = directory / "secret.raw"
    with open(path, "wb") as stream:
        for _ in range(DISK_SIZE // len(PATTERN)):
            stream.write(PATTERN)
    watch = OpenWatch(directory)
    try:
        yield path, watch
    finally:
        watch.close()


def layer_path(repo: str, vm: LabVM, point: Point, disk: str) -> Path:
    return Path(repo) / vm.uuid / point.backup_id / f"{disk}.qcow2"


def fix_manifest(repo: str, vm: LabVM, point: Point, disk: str) -> None:
    """What an attacker does next: the manifest's digest and size match the new layer."""
    path = Path(repo) / vm.uuid / point.backup_id / "manifest.json"
    doc = json.loads(path.read_text())
    layer = layer_path(repo, vm, point, disk)
    record = next(d for d in doc["disks"] if d["disk"] == disk)
    record["digest"] = file_digest(str(layer)).to_dict()
    record["file_size"] = layer.stat().st_size
    path.write_text(json.dumps(doc))


def hostile(kind: str, layer: Path, outside: Path, size: int) -> None:
    """Replace ``layer`` by an image of ``kind`` that would read ``outside``."""
    if kind == "backing-outside":  # the layer stays, its header names the outside file
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(layer))
    elif kind == "data-file":  # every guest byte would come from the outside file
        dummy = layer.with_suffix(".dummy")
        dummy.write_bytes(b"")
        layer.unlink()
        qemu_img("create", "-q", "-f", "qcow2", "-o",
                 f"data_file={dummy},data_file_raw=on", str(layer), str(size))
        qemu_img("amend", "-f", "qcow2", "-o", f"data_file={outside}", str(layer))
        dummy.unlink()
        with open(layer, "rb") as stream:  # the header sets the external data file bit
            assert struct.unpack(">Q", stream.read(80)[72:80])[0] & (1 << 2)
    elif kind == "luks":
        layer.unlink()
        qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=x",
                 "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
                 str(layer), str(size))
    elif kind == "raw":  # not an image at all: the outside pattern itself
        layer.unlink()
        shutil.copyfile(outside, layer)
    else:
        raise AssertionError(kind)


def watched_refusal(watch: OpenWatch, proc: subprocess.CompletedProcess[str],
                    *names: str) -> None:
    refused(proc, *names)
    assert watch.events() == 0, "a process opened or read the file outside the repository"


@pytest.mark.hostile
def test_hostile_layer_headers_are_refused_before_anything_is_read() -> None:
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        repo = str(vm.workdir / "repo")
        first, second, third = make_chain(vm, repo)
        sizes = {"vdb": DISK_SIZE, "sda": LUN_SIZE}
        with outside_file(vm.workdir) as (outside, watch):
            # vdb of the middle point: its header names the outside file as backing file
            hostile("backing-outside", layer_path(repo, vm, second, "vdb"), outside, DISK_SIZE)
            fix_manifest(repo, vm, second, "vdb")
            watch.events()
            for kind in ("data-file", "luks", "raw"):  # sda of the newest point, in turn
                target = layer_path(repo, vm, third, "sda")
                saved = target.read_bytes()
                hostile(kind, target, outside, sizes["sda"])
                fix_manifest(repo, vm, third, "sda")
                watch.events()  # what making the hostile image did

                watched_refusal(watch, cli("verify", "--target", repo),
                                f"backup {second.backup_id} disk vdb")
                report = json.loads(cli("verify", "--target", repo, "--json").stdout)
                assert {(d["backup_id"], d["disk"]) for d in report["disks"]
                        if not d["ok"]} == {(second.backup_id, "vdb"), (third.backup_id, "vdb"),
                                            (third.backup_id, "sda")}, (kind, report)
                bad = next(d for d in report["disks"]
                           if (d["backup_id"], d["disk"]) == (third.backup_id, "sda"))
                assert {"data-file": "external data file", "luks": "is encrypted",
                        "raw": "is not a qcow2 image"}[kind] in bad["problem"], bad
                watched_refusal(watch, cli("verify", vm.name, "--target", repo, "--backup",
                                           third.backup_id), third.backup_id)
                assert watch.events() == 0
                restore_refused(vm, repo, "sda", third.backup_id, third.backup_id, "sda")
                assert watch.events() == 0, kind
                target.write_bytes(saved)
                fix_manifest(repo, vm, third, "sda")

            refused(cli("verify", vm.name, "--target", repo, "--backup", second.backup_id),
                    second.backup_id, "vdb", str(outside))
            restore_refused(vm, repo, "vdb", second.backup_id, second.backup_id, "vdb",
                            str(outside))
            restore_refused(vm, repo, "vdb", third.backup_id, third.backup_id, "vdb",
                            second.backup_id)
            assert watch.events() == 0

            # export offers the writes since the chain's last point: refused, nothing set up
            proc = cli("export", vm.name, "--disk", "vdb", "--target", repo, "--socket",
                       str(vm.workdir / "export.sock"), "--timeout", "1")
            watched_refusal(watch, proc, second.backup_id, "vdb")
            assert not (vm.workdir / "export.sock").exists()

            for point in (first, second, third):
                for disk in DISKS:
                    if (point.backup_id, disk) not in {(second.backup_id, "vdb"),
                                                       (third.backup_id, "vdb")}:
                        restores_identically(vm, repo, point, disk)
            assert watch.events() == 0


def with_data_file(head: bytes, name: bytes) -> bytes:
    """A layer's first cluster with the external data file bit and a data file name set."""
    out = bytearray(head)
    (incompatible,) = struct.unpack_from(">Q", out, 72)
    struct.pack_into(">Q", out, 72, incompatible | 1 << 2)
    (header_length,) = struct.unpack_from(">I", out, 100)
    extension = struct.pack(">II", 0x44415441, len(name)) + name + bytes(-len(name) % 8)
    out[header_length:header_length] = extension  # in front of the existing extensions
    return bytes(out[:len(head)])


def plant_data_file(volume: str | Path, offset: int, outside: Path) -> None:
    """Rewrite, in a served volume file, the header of the layer at ``offset`` so that it
    names ``outside`` as its external data file."""
    with open(volume, "r+b") as stream:
        stream.seek(offset)
        head = stream.read(HEADER_READ)
        stream.seek(offset)
        stream.write(with_data_file(head, str(outside).encode()))


@dataclass
class VolumeChain:
    """A VM and a volume file holding a chain of its disks (full and two incrementals)."""

    vm: LabVM
    volume: Path
    points: list[Point]


@pytest.fixture(scope="module")
def volume_chain() -> Iterator[VolumeChain]:
    """The chain is made once for the volume tests of this module; each test damages a
    copy of the volume of its own (:func:`served_copy`)."""
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        server = VolumeServer(vm.workdir / "volume.img")
        server.start()
        try:
            points = make_chain(vm, server.uri)
        finally:
            server.stop()
        yield VolumeChain(vm, server.path, points)


@contextmanager
def served_copy(chain: VolumeChain, name: str) -> Iterator[VolumeServer]:
    """A copy of the chain's volume, served on a port of its own; removed afterwards."""
    path = chain.vm.workdir / f"{name}.img"
    subprocess.run(["cp", "--sparse=always", str(chain.volume), str(path)], check=True)
    server = VolumeServer(path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        path.unlink()


@pytest.mark.hostile
def test_a_data_file_named_in_an_nbd_volume_layer_is_refused(
        volume_chain: VolumeChain) -> None:
    """The same attack from a backup server: a layer in the volume names a data file."""
    vm = volume_chain.vm
    with outside_file(vm.workdir, "outside-data-file") as (outside, watch), \
            served_copy(volume_chain, "data-file") as server:
        repo = server.uri
        first, second, third = volume_chain.points
        manifest = next(m for m in api.list_backups(repo) if m.backup_id == third.backup_id)
        location = manifest.disk("sda").location  # type: ignore[union-attr]
        assert location is not None
        offset = int(location["offset"])
        plant_data_file(server.path, offset, outside)
        watch.events()

        watched_refusal(watch, cli("verify", "--target", repo),
                        f"backup {third.backup_id} disk sda", "external data file")
        restore_refused(vm, repo, "sda", third.backup_id, third.backup_id, "sda",
                        "external data file")
        assert watch.events() == 0
        for point in (first, second, third):
            for disk in DISKS:
                if (point.backup_id, disk) != (third.backup_id, "sda"):
                    restores_identically(vm, repo, point, disk)
        assert watch.events() == 0


@pytest.mark.bad_input
def test_paths_with_commas_and_colons_are_never_misparsed() -> None:
    """A repository under ``a,b:c`` and a restore target named ``x:y,z`` work as paths:
    full, incremental and resync layers, their chain, and the restore compare equal."""
    with lab_vm(loop_size=DISK_SIZE, lun_size=LUN_SIZE) as vm:
        base = vm.workdir / "odd,dir=x:y"
        base.mkdir()
        repo = str(base / "repo,driver=raw")
        first, second, third = make_chain(vm, repo)
        fourth, disks = back_up(vm, repo, vm.workdir, 3, level="resync")
        assert disks["vdb"]["level"] == "resync", disks["vdb"]
        for point in (first, second, third, fourth):
            restores_identically(vm, repo, point, "vdb")
        os.chdir(base)
        try:
            target = Path("x:y,z.raw")
            target.write_bytes(b"")
            os.truncate(target, LUN_SIZE)
            proc = cli("restore", vm.name, "--target", repo, "--disk", "sda", "--to",
                       str(target), "--backup", third.backup_id)
            assert proc.returncode == 0, proc.stderr
            assert target.read_bytes() == third.refs["sda"].read_bytes()
        finally:
            os.chdir("/")
        assert api.verify(repo).ok


@pytest.mark.hostile
def test_a_volume_cannot_show_qemu_another_header_than_it_showed_the_check(
        volume_chain: VolumeChain) -> None:
    """The server answers the check with the good header, then changes it before QEMU
    opens the layer: QEMU still reads the header that was checked (a local copy)."""
    vm = volume_chain.vm
    with outside_file(vm.workdir, "outside-swapped") as (outside, watch), \
            served_copy(volume_chain, "swapped") as server:
        repo = server.uri
        third = volume_chain.points[2]
        out = vm.workdir / "swapped.raw"
        with open_store(repo) as store:
            manifest = next(m for m in store.scan().backups
                            if m.backup_id == third.backup_id)
            points = verify_lineage(store, manifest, "sda")  # headers checked here
            for point in points:  # ... and changed on the server right after
                offset = int((point.record.location or {})["offset"])
                plant_data_file(server.path, offset, outside)
            watch.events()
            with open_target(str(out), points[0].record.size, False, None) as target:
                write_disk(store.image_node(points), points[0].record, target)
        assert watch.events() == 0, "QEMU opened the data file the server named late"
        assert out.read_bytes() == third.refs["sda"].read_bytes()
