"""``serve``, ``mount`` and ``umount`` on the lab: a LUN holding a GPT with an ext4 and an XFS
partition, backed up twice with files changed in between; the older point is read back over
NBD (unix socket, TCP, TLS) and mounted, byte for byte as it was, and every piece goes again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine import mount_state
from tests.lab.tls import make_certificates
from tests.lab.volume_server import VolumeServer
from tools.labkit import (
    MiB,
    block_disk,
    loop_device,
    rdm_backup,
    rdm_backup_argv,
    rdmb_tmpdir,
    same_bytes,
    unique_name,
)
from tools.labkit import (
    test_domain as lab_domain,
)

pytestmark = pytest.mark.lab

DISK_SIZE = 400 * MiB
EXT4 = (MiB, 48 * MiB)  # offset, size of p1
XFS = (49 * MiB, 340 * MiB)  # of p2 (XFS needs 300 MiB)
LVM = (389 * MiB, 4 * MiB)  # p3: an LVM physical volume's label
SWAP = (393 * MiB, 4 * MiB)  # p4: swap space


@dataclass
class Point:
    backup_id: str
    raw: Path  # the LUN's bytes at backup time
    files: dict[str, str]  # "p1/name" -> sha256


@dataclass
class Lab:
    name: str
    repo: str
    workdir: Path
    lun: str
    image: Path
    old: Point
    new: Point


def _lvm_label(image: Path, offset: int, size: int) -> None:
    """An LVM2 physical volume label (what ``pvcreate`` writes first; blkid checks its CRC,
    LVM's crc32 variant), without the LVM tools."""
    label = bytearray(512)
    label[0:8] = b"LABELONE"
    struct.pack_into("<QII", label, 8, 1, 0, 32)
    label[24:32] = b"LVM2 001"
    label[32:64] = b"rdmbTESTpv000000rdmbTESTpv000000"
    struct.pack_into("<Q", label, 64, size)
    crc = ~zlib.crc32(bytes(label[20:]), ~0xF597A6CF & 0xFFFFFFFF) & 0xFFFFFFFF
    struct.pack_into("<I", label, 16, crc)
    with open(image, "r+b") as stream:
        stream.seek(offset + 512)
        stream.write(label)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _partition_mounted(image: Path, where: tuple[int, int], mnt: Path,
                       options: str = "rw") -> Iterator[Path]:
    with loop_device(image, offset=where[0], sizelimit=where[1]) as device:
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", options, device, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def _write_files(image: Path, workdir: Path, files: dict[str, bytes]) -> None:
    for part, where in (("p1", EXT4), ("p2", XFS)):
        with _partition_mounted(image, where, workdir / f"host-{part}") as mnt:
            for name, data in files.items():
                if name.startswith(part + "/"):
                    (mnt / name.split("/", 1)[1]).write_bytes(data)


def _files_of(image: Path, workdir: Path) -> dict[str, str]:
    found = {}
    for part, where in (("p1", EXT4), ("p2", XFS)):
        with _partition_mounted(image, where, workdir / f"host-{part}", "ro") as mnt:
            for path in mnt.iterdir():
                if path.is_file():
                    found[f"{part}/{path.name}"] = _sha(path)
    return found


def _backup(name: str, repo: str, lun: str, image: Path, workdir: Path, tag: str) -> Point:
    raw = workdir / f"{tag}.raw"
    shutil.copyfile(image, raw)
    # the files were written through other loop devices: no stale cache of the LUN's is read
    subprocess.run(["blockdev", "--flushbufs", lun], check=True)
    done = rdm_backup("backup", name, "--target", repo, "--json")
    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]
    return Point(backup_id, raw, _files_of(image, workdir))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with rdmb_tmpdir() as workdir:
        image = workdir / "lun.img"
        with open(image, "wb") as stream:
            stream.truncate(DISK_SIZE)
        table = (f"label: gpt\nstart={EXT4[0] // 512}, size={EXT4[1] // 512}\n"
                 f"start={XFS[0] // 512}, size={XFS[1] // 512}\n"
                 f"start={LVM[0] // 512}, size={LVM[1] // 512}, type=lvm\n"
                 f"start={SWAP[0] // 512}, size={SWAP[1] // 512}, type=swap\n")
        subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True)
        _lvm_label(image, *LVM)
        for where, mkfs in ((EXT4, ["mkfs.ext4", "-q"]), (XFS, ["mkfs.xfs", "-q"]),
                            (SWAP, ["mkswap"])):
            with loop_device(image, offset=where[0], sizelimit=where[1]) as device:
                subprocess.run([*mkfs, device], check=True, capture_output=True)
        _write_files(image, workdir, {"p1/kept": os.urandom(300_000),
                                      "p1/changed": b"old contents\n" * 1000,
                                      "p2/data": os.urandom(2 * MiB)})
        repo = str(workdir / "repo")
        name = unique_name("rdmb-files")
        with loop_device(image) as lun, \
                lab_domain(name, [block_disk("vdb", lun)], start=False):
            old = _backup(name, repo, lun, image, workdir, "old")
            _write_files(image, workdir, {"p1/changed": b"new contents\n" * 999,
                                          "p1/added": b"added later\n",
                                          "p2/data": os.urandom(MiB)})
            new = _backup(name, repo, lun, image, workdir, "new")
            assert old.files != new.files and "p1/added" not in old.files
            try:
                yield Lab(name, repo, workdir, lun, image, old, new)
            finally:  # what a failed test left mounted goes before its directory does
                for directory in workdir.iterdir():
                    if os.path.exists(mount_state.state_path(str(directory))):
                        rdm_backup("umount", str(directory))


# -- serve ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _serving(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``rdm-backup serve ARGS``: its first line once it printed it, then SIGTERM, exit 0."""
    proc = subprocess.Popen([*rdm_backup_argv(), "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.stderr.read() if proc.stderr else ""
        yield first, proc
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_unix_socket_reads_as_the_lun_did(lab: Lab) -> None:
    sock = lab.workdir / "serve.sock"
    with _serving(lab.name, "--target", lab.repo, "--disk", "vdb", "--backup",
                  lab.old.backup_id, "--socket", str(sock)) as (first, _proc):
        uri = first.strip()
        assert uri == f"nbd+unix:///vdb?socket={sock}"
        assert os.stat(sock).st_mode & 0o777 == 0o600
        out = lab.workdir / "served-unix.raw"
        subprocess.run(["nbdcopy", uri, str(out)], check=True)  # at once: no polling
        assert same_bytes(out, lab.old.raw)
        out.unlink()
    assert not sock.exists()


def test_serve_over_tcp_with_json(lab: Lab) -> None:
    with _serving(lab.name, "--target", lab.repo, "--disk", "vdb", "--listen", "127.0.0.1:0",
                  "--json") as (first, _proc):
        document = json.loads(first)
        assert document["backup_id"] == lab.new.backup_id and document["verified"] is True
        assert document["disk"] == "vdb" and document["export"] == "vdb"
        assert document["size"] == DISK_SIZE and document["uri"].startswith("nbd://127.0.0.1:")
        out = lab.workdir / "served-tcp.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", document["uri"],
                        str(out)], check=True)
        assert same_bytes(out, lab.new.raw)
        out.unlink()


def test_serve_over_tls(lab: Lab) -> None:
    server, client = make_certificates(lab.workdir / "tls")
    with _serving(lab.name, "--target", lab.repo, "--disk", "vdb", "--backup",
                  lab.old.backup_id, "--listen", "127.0.0.1:0", "--tls-creds",
                  str(server)) as (first, _proc):
        uri = first.strip()
        assert uri.startswith("nbds://127.0.0.1:")
        plain = subprocess.run(["nbdinfo", uri.replace("nbds://", "nbd://")],
                               capture_output=True, check=False)
        assert plain.returncode != 0  # no TLS, no data
        out = lab.workdir / "served-tls.raw"
        subprocess.run(["nbdcopy", f"{uri}?tls-certificates={client}", str(out)], check=True)
        assert same_bytes(out, lab.old.raw)
        out.unlink()


def test_serve_without_verifying_warns_and_stops_at_its_timeout(lab: Lab) -> None:
    done = subprocess.run([*rdm_backup_argv(), "serve", lab.name, "--target", lab.repo,
                           "--disk", "vdb", "--socket", str(lab.workdir / "nv.sock"),
                           "--no-verify", "--timeout", "2"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--no-verify: the layers' digests were not checked" in done.stderr
    assert done.stdout.splitlines()[0].startswith("nbd+unix:///vdb?socket=")
    assert "timeout" in done.stdout and not (lab.workdir / "nv.sock").exists()


@pytest.mark.bad_input
def test_a_damaged_layer_is_refused_before_serving(lab: Lab) -> None:
    repo = lab.workdir / "damaged-repo"
    shutil.copytree(lab.repo, repo)
    layer = next(p for p in repo.rglob("*.qcow2") if lab.old.backup_id in str(p))
    with open(layer, "r+b") as stream:
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last[0] ^ 0xFF]))
    sock = lab.workdir / "damaged.sock"
    done = rdm_backup("serve", lab.name, "--target", str(repo), "--disk", "vdb", "--backup",
                      lab.old.backup_id, "--socket", str(sock))
    assert done.returncode == 5, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert "mismatch" in done.stderr and not sock.exists()
    shutil.rmtree(repo)


def test_serve_and_mount_from_an_nbd_volume(lab: Lab) -> None:
    server = VolumeServer(lab.workdir / "volume.img", size=2 << 30)
    server.start()
    try:
        point = _backup(lab.name, server.uri, lab.lun, lab.image, lab.workdir, "volume")
        sock = lab.workdir / "volume.sock"
        with _serving(lab.name, "--target", server.uri, "--disk", "vdb", "--socket",
                      str(sock)) as (first, _proc):
            out = lab.workdir / "served-volume.raw"
            subprocess.run(["nbdcopy", first.strip(), str(out)], check=True)
            assert same_bytes(out, point.raw)
            out.unlink()
        mnt = lab.workdir / "mnt-volume"
        mnt.mkdir()
        done = rdm_backup("mount", lab.name, "--target", server.uri, "--disk", "vdb",
                          "--backup", point.backup_id, "--json", str(mnt))
        assert done.returncode == 0, done.stderr
        try:
            seen = {f"{part}/{path.name}": _sha(path) for part in ("p1", "p2")
                    for path in (mnt / part).iterdir() if path.is_file()}
            assert seen == point.files == lab.new.files
        finally:
            assert rdm_backup("umount", str(mnt)).returncode == 0
        assert list(mnt.iterdir()) == []
    finally:
        server.stop()


# -- mount and umount -----------------------------------------------------------------------------

def _loops_over(directory: str) -> list[str]:
    listed = json.loads(subprocess.run(["losetup", "-J", "-l"], capture_output=True,
                                       text=True, check=True).stdout or '{"loopdevices": []}')
    return [d["name"] for d in listed.get("loopdevices", [])
            if str(d.get("back-file") or "").startswith(directory)]


def _mounted_under(directory: str) -> list[str]:
    with open("/proc/mounts", encoding="utf-8") as stream:
        return [line.split()[1] for line in stream if line.split()[1].startswith(directory)]


def test_mount_shows_the_older_files_and_umount_removes_every_piece(lab: Lab) -> None:
    mnt = lab.workdir / "mnt"
    mnt.mkdir()
    done = rdm_backup("mount", lab.name, "--target", lab.repo, "--disk", "vdb", "--backup",
                      lab.old.backup_id, "--json", str(mnt))
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    run_dir = mount_state.run_dir(str(mnt))
    try:
        assert listing["partition_table"] == "gpt"
        assert [(p["name"], p["fstype"], p["mounted"], p["reason"])
                for p in listing["partitions"]] == [
            ("p1", "ext4", True, None), ("p2", "xfs", True, None),
            ("p3", "LVM2_member", False,
             "LVM physical volume: not mounted (LVM is out of scope)"),
            ("p4", "swap", False, "swap space: nothing to mount")]
        assert sorted(p.name for p in mnt.iterdir()) == ["p1", "p2"]
        seen = {f"{part}/{path.name}": _sha(path) for part in ("p1", "p2")
                for path in (mnt / part).iterdir() if path.is_file()}
        assert seen == lab.old.files
        write = subprocess.run(["touch", str(mnt / "p1" / "new-file")], capture_output=True,
                               check=False)
        assert write.returncode != 0  # read-only
        assert len(_loops_over(run_dir)) == 2 and len(_mounted_under(str(mnt))) == 2
        supervisor = listing["supervisor_pid"]
        assert os.path.exists(f"/proc/{supervisor}")
    finally:
        undone = rdm_backup("umount", str(mnt), "--json")
    assert undone.returncode == 0, undone.stderr
    assert json.loads(undone.stdout)["unmounted"] == [str(mnt / "p2"), str(mnt / "p1")]
    assert _loops_over(run_dir) == [] and _mounted_under(str(mnt)) == []
    assert _mounted_under(run_dir) == [] and not os.path.exists(run_dir)
    assert not os.path.exists(mount_state.state_path(str(mnt)))
    assert list(mnt.iterdir()) == []
    stat = Path(f"/proc/{supervisor}/stat")
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z"


def test_mount_stops_cleanly_on_sigterm_to_its_supervisor(lab: Lab) -> None:
    mnt = lab.workdir / "mnt-signal"
    mnt.mkdir()
    done = rdm_backup("mount", lab.name, "--target", lab.repo, "--disk", "vdb", "--json",
                      str(mnt))
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    run_dir = mount_state.run_dir(str(mnt))
    os.kill(listing["supervisor_pid"], signal.SIGTERM)
    from libvirt_rdm_backup import loopmount
    assert loopmount.wait_gone(listing["supervisor_pid"],
                               loopmount.process_start(listing["supervisor_pid"]), 60)
    assert _loops_over(run_dir) == [] and _mounted_under(str(mnt)) == []
    assert not os.path.exists(run_dir)
    assert not os.path.exists(mount_state.state_path(str(mnt)))
    assert rdm_backup("umount", str(mnt)).returncode == 2  # nothing left to undo


@pytest.mark.bad_input
def test_a_busy_mountpoint_is_refused_and_nothing_is_done(lab: Lab) -> None:
    mnt = lab.workdir / "busy"
    mnt.mkdir()
    (mnt / "something").write_text("mine")
    done = rdm_backup("mount", lab.name, "--target", lab.repo, "--disk", "vdb", str(mnt))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "busy" in done.stderr
    assert not os.path.exists(mount_state.state_path(str(mnt)))
    assert [p.name for p in mnt.iterdir()] == ["something"]


@pytest.mark.hostile
def test_umount_refuses_a_hostile_state_file(lab: Lab) -> None:
    mnt = lab.workdir / "hostile"
    mnt.mkdir()
    path = mount_state.state_path(str(mnt))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    document = {"version": 1, "mountpoint": str(mnt.resolve()),
                "run_dir": mount_state.run_dir(str(mnt)),
                "supervisor": {"pid": 1, "start": 1}, "nbdfuse": None,
                "pieces": [{"name": "p1", "device": "/dev/loop0", "path": "/",
                            "offset": 0, "size": 1, "mounted": True}],
                "backup_id": "x", "disk": "vdb"}
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(document, stream)
    try:
        done = rdm_backup("umount", str(mnt))
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert "refused" in done.stderr
    finally:
        os.unlink(path)


@pytest.mark.bad_input
def test_umount_of_a_busy_filesystem_undoes_nothing_until_it_is_free(lab: Lab) -> None:
    mnt = lab.workdir / "mnt-busy"
    mnt.mkdir()
    done = rdm_backup("mount", lab.name, "--target", lab.repo, "--disk", "vdb", "--backup",
                      lab.old.backup_id, "--no-verify", str(mnt))
    assert done.returncode == 0, done.stderr
    assert "--no-verify: the layers' digests were not checked" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"mounted backup {lab.old.backup_id} of {lab.name} disk vdb")
    assert lines[1].split()[:2] == ["p1", "ext4"] and lines[1].endswith(f"mounted on {mnt}/p1")
    assert lines[2].split()[:2] == ["p2", "xfs"] and lines[2].endswith(f"mounted on {mnt}/p2")
    assert lines[3].split()[:2] == ["p3", "LVM2_member"]
    assert lines[3].endswith("LVM physical volume: not mounted (LVM is out of scope)")
    user = subprocess.Popen(["sleep", "600"], cwd=mnt / "p1")
    try:
        busy = rdm_backup("umount", str(mnt))
        assert busy.returncode == 4 and busy.stderr.count("\n") == 1, busy.stderr
        assert "busy" in busy.stderr
        # p2 went first; p1 is refused and stays, with everything below it
        assert _mounted_under(str(mnt)) == [str(mnt / "p1")]
        assert os.path.exists(mount_state.state_path(str(mnt)))
        assert len(_loops_over(mount_state.run_dir(str(mnt)))) == 1
    finally:
        user.kill()
        user.wait()
    again = rdm_backup("umount", str(mnt))
    assert again.returncode == 0, again.stderr
    assert _mounted_under(str(mnt)) == [] and list(mnt.iterdir()) == []


@pytest.mark.fault
def test_umount_undoes_everything_after_the_supervisor_was_killed(lab: Lab) -> None:
    mnt = lab.workdir / "mnt-killed"
    mnt.mkdir()
    done = rdm_backup("mount", lab.name, "--target", lab.repo, "--disk", "vdb", "--json",
                      str(mnt))
    assert done.returncode == 0, done.stderr
    supervisor = json.loads(done.stdout)["supervisor_pid"]
    run_dir = mount_state.run_dir(str(mnt))
    from libvirt_rdm_backup import loopmount
    start = loopmount.process_start(supervisor)
    os.kill(supervisor, signal.SIGKILL)
    assert loopmount.wait_gone(supervisor, start, 30)
    undone = rdm_backup("umount", str(mnt), "--json")
    assert undone.returncode == 0, undone.stderr
    assert json.loads(undone.stdout)["supervisor_stopped"] is False
    assert _loops_over(run_dir) == [] and _mounted_under(str(mnt)) == []
    assert _mounted_under(run_dir) == [] and not os.path.exists(run_dir)
    assert not os.path.exists(mount_state.state_path(str(mnt)))
    assert list(mnt.iterdir()) == []


def test_serve_from_an_nbd_volume_over_tls(lab: Lab) -> None:
    server_dir, client_dir = make_certificates(lab.workdir / "tls-volume")
    server = VolumeServer(lab.workdir / "tls-volume.img", size=2 << 30, tls_dir=server_dir)
    server.start()
    try:
        raw = lab.workdir / "tls-volume.raw"
        shutil.copyfile(lab.image, raw)
        subprocess.run(["blockdev", "--flushbufs", lab.lun], check=True)
        done = rdm_backup("backup", lab.name, "--target", server.uri, "--tls-creds",
                          str(client_dir), "--json")
        assert done.returncode == 0, done.stderr
        with _serving(lab.name, "--target", server.uri, "--disk", "vdb", "--socket",
                      str(lab.workdir / "tls-volume.sock"), "--tls-creds",
                      str(client_dir)) as (first, _proc):
            out = lab.workdir / "served-tls-volume.raw"
            subprocess.run(["nbdcopy", first.strip(), str(out)], check=True)
            assert same_bytes(out, raw)
            out.unlink()
    finally:
        server.stop()


def test_prune_waits_while_a_point_is_served(lab: Lab) -> None:
    repo = lab.workdir / "prune-repo"
    shutil.copytree(lab.repo, repo)
    subprocess.run(["blockdev", "--flushbufs", lab.lun], check=True)
    third = rdm_backup("backup", lab.name, "--target", str(repo))  # the newer point is
    assert third.returncode == 0, third.stderr  # no longer the newest: a prune may drop it
    with _serving(lab.name, "--target", str(repo), "--disk", "vdb", "--backup",
                  lab.new.backup_id, "--socket", str(lab.workdir / "prune.sock")) as (first, _p):
        prune = subprocess.Popen([*rdm_backup_argv(), "prune", lab.name, "--target", str(repo),
                                  "--keep-last", "1", "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                prune.wait(5)  # held back: the served layers stay
            out = lab.workdir / "served-during-prune.raw"
            subprocess.run(["nbdcopy", first.strip(), str(out)], check=True)
            assert same_bytes(out, lab.new.raw)
            out.unlink()
        except BaseException:
            prune.kill()
            prune.wait()
            raise
    pruned, err = prune.communicate(timeout=300)
    assert prune.returncode == 0, err
    assert [d for plan in json.loads(pruned) for d in plan["dropped"]] == [lab.new.backup_id]
    shutil.rmtree(repo)


@pytest.mark.fault
def test_an_interrupted_mount_leaves_nothing_behind(lab: Lab) -> None:
    mnt = lab.workdir / "mnt-interrupted"
    mnt.mkdir()
    proc = subprocess.Popen([*rdm_backup_argv(), "mount", lab.name, "--target", lab.repo,
                             "--disk", "vdb", str(mnt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state = mount_state.state_path(str(mnt))
    for _ in range(300):  # the supervisor runs and is setting up: the command waits for it
        if os.path.exists(state) or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it was done already: then umount undoes it
        assert rdm_backup("umount", str(mnt)).returncode == 0
    else:
        assert proc.returncode == 4 and "interrupted" in err, err
    for _ in range(600):
        if not os.path.exists(state):
            break
        time.sleep(0.1)
    assert not os.path.exists(state) and _mounted_under(str(mnt)) == []
    assert _loops_over(mount_state.run_dir(str(mnt))) == []
    assert not os.path.exists(mount_state.run_dir(str(mnt))) and list(mnt.iterdir()) == []
