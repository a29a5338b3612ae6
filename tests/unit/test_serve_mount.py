"""``serve``, ``mount`` and ``umount`` without the lab: their input checks, the partitions of a
real image file, and the state file that ``umount`` refuses to act on when it is not ours."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from libvirt_rdm_backup import loopmount, partitions
from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.engine import mount_state, unmount
from libvirt_rdm_backup.engine.mount import check_mountpoint
from libvirt_rdm_backup.engine.mount_state import MountState, Piece, Proc
from libvirt_rdm_backup.engine.serve import (
    ServeRequest,
    check_socket_path,
    listener_config,
    store_tls,
)
from libvirt_rdm_backup.errors import UsageError

MiB = 1 << 20


def _request(**changes: object) -> ServeRequest:
    fields: dict[str, object] = {"domain": "vm", "target": "/backups", "disk": "vdb",
                                 "socket": None, "listen": "127.0.0.1:0"}
    fields.update(changes)
    return ServeRequest(**fields)  # type: ignore[arg-type]


# -- serve's input --------------------------------------------------------------------------------

@pytest.mark.bad_input
def test_a_socket_path_where_something_else_lives_is_refused(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(UsageError, match="not a socket"):
        check_socket_path(str(regular))
    assert regular.read_text() == "keep me"
    with pytest.raises(UsageError, match="does not exist"):
        check_socket_path(str(tmp_path / "missing" / "s.sock"))
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(live))
        server.listen(1)
        with pytest.raises(UsageError, match="in use"):
            check_socket_path(str(live))
    check_socket_path(str(live))  # stale now: fine
    check_socket_path(str(tmp_path / "new.sock"))


@pytest.mark.bad_input
def test_plain_nbd_off_loopback_is_refused() -> None:
    with pytest.raises(UsageError, match="without TLS"):
        listener_config(_request(listen="192.0.2.1:10809"))


def test_any_free_port_and_tls_on_the_listener() -> None:
    config = listener_config(_request(listen="127.0.0.1:0"))
    assert config.address.port == 0 and not config.address.tls
    config = listener_config(_request(listen="127.0.0.1:0", tls_dir="/creds"))
    assert config.address.tls and config.tls_dir == "/creds"


@pytest.mark.bad_input
def test_tls_creds_go_to_the_listener_or_an_nbds_target() -> None:
    assert store_tls(_request(tls_dir="/creds")) is None  # the listener's
    assert store_tls(_request(target="nbds://127.0.0.1:10809/b", tls_dir="/c")) == "/c"
    with pytest.raises(UsageError, match="--tls-creds applies"):
        store_tls(_request(listen=None, socket="/run/x.sock", tls_dir="/creds"))


@pytest.mark.bad_input
@pytest.mark.parametrize("argv", [
    ["serve", "vm", "--target", "/x", "--disk", "vdb"],
    ["serve", "vm", "--target", "/x", "--disk", "vdb", "--socket", "/s", "--listen", "h:1"],
    ["serve", "vm", "--target", "/x", "--disk", "vdb", "--socket", "/s", "--timeout", "0"],
    ["serve", "vm", "--target", "/x", "--disk", "../vdb", "--listen", "127.0.0.1:0"],
    ["mount", "vm", "--target", "/x", "--disk", "vdb"],
    ["umount"],
])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdm-backup: error:") and err.count("\n") == 1


# -- mount's mountpoint ---------------------------------------------------------------------------

@pytest.mark.bad_input
def test_a_busy_mountpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    root = tmp_path / "run" / "mounts"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a-file").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        check_mountpoint(str(busy), str(root))
    with pytest.raises(UsageError, match="not an existing directory"):
        check_mountpoint(str(busy / "a-file"), str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_mountpoint(str(empty), str(root)) == str(empty)
    root.mkdir(parents=True)
    Path(mount_state.state_path(str(empty), str(root))).write_text("{}")
    with pytest.raises(UsageError, match="a mount of rdm-backup uses it"):
        check_mountpoint(str(empty), str(root))
    assert main(["mount", "vm", "--target", str(tmp_path), "--disk", "vdb", str(busy)]) == 2
    err = capsys.readouterr().err
    assert "is busy" in err and err.count("\n") == 1
    assert os.listdir(busy) == ["a-file"]


@pytest.mark.bad_input
def test_umount_of_something_that_is_not_ours(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["umount", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a mount of rdm-backup" in err and err.count("\n") == 1


# -- the state file -------------------------------------------------------------------------------

def _dead_process() -> Proc:
    """A process that was, and is gone."""
    proc = subprocess.Popen(["true"])
    start = loopmount.process_start(proc.pid) or 1
    proc.wait()
    return Proc(proc.pid, start)


def _state(tmp_path: Path) -> tuple[MountState, str]:
    root = str(tmp_path / "mounts")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    real = str(mountpoint.resolve())
    state = MountState(real, mount_state.run_dir(real, root), _dead_process(),
                       pieces=[Piece("p1", "/dev/loop999999", f"{real}/p1", 0, MiB, True)],
                       backup_id="b", disk="vdb")
    return state, root


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    state, root = _state(tmp_path)
    mount_state.save(state, root)
    path = mount_state.state_path(state.mountpoint, root)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert mount_state.load(state.mountpoint, root) == state


def test_umount_undoes_what_a_dead_supervisor_left(tmp_path: Path) -> None:
    state, root = _state(tmp_path)
    state.pieces = []
    os.makedirs(state.fuse_dir)
    mount_state.save(state, root)
    done = unmount.umount(state.mountpoint, root)
    assert done.unmounted == [] and not done.supervisor_stopped
    assert not os.path.exists(state.run_dir)
    assert not os.path.exists(mount_state.state_path(state.mountpoint, root))


def _hostile(document: dict[str, object], state: MountState) -> dict[str, object]:
    return {**state.to_dict(), **document}


HOSTILE: dict[str, Callable[[MountState], object]] = {
    "another mountpoint": lambda s: _hostile({"mountpoint": "/"}, s),
    "run dir elsewhere": lambda s: _hostile({"run_dir": "/etc"}, s),
    "piece outside the mountpoint": lambda s: _hostile(
        {"pieces": [{"name": "p1", "device": "/dev/loop1", "path": "/etc", "offset": 0,
                     "size": 1, "mounted": True}]}, s),
    "piece with a bad name": lambda s: _hostile(
        {"pieces": [{"name": "../x", "device": "/dev/loop1", "path": f"{s.mountpoint}/../x",
                     "offset": 0, "size": 1, "mounted": True}]}, s),
    "not a loop device": lambda s: _hostile(
        {"pieces": [{"name": "p1", "device": "/dev/sda", "path": f"{s.mountpoint}/p1",
                     "offset": 0, "size": 1, "mounted": True}]}, s),
    "pid 1 as the supervisor": lambda s: _hostile(
        {"supervisor": {"pid": 1, "start": loopmount.process_start(1)}}, s),
    "our own process as nbdfuse": lambda s: _hostile(
        {"nbdfuse": {"pid": os.getpid(), "start": loopmount.process_start(os.getpid())}}, s),
    "an extra key": lambda s: _hostile({"command": "rm -rf /"}, s),
    "a string pid": lambda s: _hostile({"supervisor": {"pid": "1", "start": 1}}, s),
    "not a dict": lambda s: [1, 2],
}


@pytest.mark.hostile
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_state_file_is_refused(case: str, tmp_path: Path) -> None:
    state, root = _state(tmp_path)
    mount_state.save(state, root)
    path = mount_state.state_path(state.mountpoint, root)
    Path(path).write_text(json.dumps(HOSTILE[case](state)))
    with pytest.raises(UsageError, match="state file"):
        unmount.umount(state.mountpoint, root)
    assert os.path.exists(path)


@pytest.mark.hostile
def test_a_state_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    state, root = _state(tmp_path)
    mount_state.save(state, root)
    path = mount_state.state_path(state.mountpoint, root)
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)
    with pytest.raises(UsageError, match="cannot read"):
        mount_state.load(state.mountpoint, root)


# -- partitions of an image file ------------------------------------------------------------------

def _tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")


def test_partitions_and_filesystems_of_an_image(tmp_path: Path) -> None:
    for tool in ("sfdisk", "blkid", "mkfs.ext4"):
        _tool(tool)
    image = tmp_path / "disk.img"
    with open(image, "wb") as stream:
        stream.truncate(24 * MiB)
    subprocess.run(["sfdisk", "-q", str(image)], input="label: gpt\n,8M\n,8M\n,\n",
                   text=True, check=True, capture_output=True)
    label, found = partitions.areas(str(image), 24 * MiB)
    assert label == "gpt" and [a.name for a in found] == ["p1", "p2", "p3"]
    first = found[0]
    subprocess.run(["mkfs.ext4", "-q", "-E", f"offset={first.offset}", str(image),
                    f"{first.size // 1024}k"], check=True, capture_output=True)
    _label, found = partitions.areas(str(image), 24 * MiB)
    assert found[0].fstype == "ext4" and found[0].mount_options() == "ro,noload"
    assert found[1].fstype is None and found[1].not_mountable() == "no filesystem found"
    assert found[0].offset == MiB and found[0].size == 8 * MiB


def test_a_bare_filesystem_is_the_whole_disk(tmp_path: Path) -> None:
    for tool in ("sfdisk", "blkid", "mkfs.ext4"):
        _tool(tool)
    image = tmp_path / "bare.img"
    with open(image, "wb") as stream:
        stream.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True, capture_output=True)
    label, found = partitions.areas(str(image), 8 * MiB)
    assert label is None and [(a.name, a.fstype) for a in found] == [("disk", "ext4")]


def test_what_is_not_mounted_and_why() -> None:
    lvm = partitions.Area("p3", 0, MiB, "LVM2_member")
    assert lvm.mount_options() is None
    assert lvm.not_mountable() == "LVM physical volume: not mounted (LVM is out of scope)"
    assert partitions.Area("p1", 0, MiB, "xfs").mount_options() == "ro,norecovery,nouuid"
    assert partitions.Area("p1", 0, MiB, "vfat").mount_options() == "ro"
