"""The QMP side of a pull-mode export, against a scripted monitor: one transaction fixes
the point of every disk (with the dirty bitmap of the chain's last backup merged into a
temporary one), one NBD server with a read-only export per disk, and a teardown in reverse
in which every step runs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.engine import export as export_mod
from libvirt_rdm_backup.engine.export import Export, _Setup, _start, _Teardown
from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.qemu import img
from tests.unit.fake_monitor import FakeMonitor

SIZE = 1024 * 1024
TOKEN = "abc123"
TEMP_BITMAP = f"rdmb-dirty-{TOKEN}"
CHAIN_BITMAP = "rdmb-repo1-daily-20261207T070000Z"
NODES = {"vdb": "libvirt-1-format", "vdc": "libvirt-2-format"}
FLEECE_DOWN = ["job-cancel", "job-dismiss", "blockdev-del rdmb-fleece", "remove-fd"]


@pytest.fixture(autouse=True)
def no_qemu_img(monkeypatch: pytest.MonkeyPatch) -> None:
    def create(path: str, fmt: str, size: int, backing: str | None = None) -> None:
        Path(path).write_bytes(b"")

    monkeypatch.setattr(img, "create", create)


def disks() -> list[RawDisk]:
    return [RawDisk(target=t, source_kind=SourceKind.BLOCK, device="disk", size=SIZE,
                    node_name=n) for t, n in NODES.items()]


def start(monitor: FakeMonitor, tmp_path: Path, undo: _Teardown) -> Export:
    """Export vdb (with the writes since backup B1) and vdc on a socket in ``tmp_path``."""
    setup = _Setup("dom", "uuid-1", disks(), NODES, {"vdb": (CHAIN_BITMAP, "B1")},
                   {"vdc": "chain daily has no backup of vdc"}, TOKEN, TEMP_BITMAP,
                   str(tmp_path / "nbd.sock"), None, str(tmp_path))
    return _start(monitor, setup, undo)


def test_one_transaction_fixes_the_point_of_every_exported_disk(tmp_path: Path) -> None:
    monitor = FakeMonitor()
    handle = start(monitor, tmp_path, _Teardown())

    assert monitor.steps() == [
        "add-fd", "blockdev-add qcow2 rdmb-fleece",
        "add-fd", "blockdev-add qcow2 rdmb-fleece",
        "transaction block-dirty-bitmap-add rdmb-fleece + block-dirty-bitmap-merge rdmb-fleece"
        " + blockdev-backup none libvirt-1-format->rdmb-fleece"
        " + blockdev-backup none libvirt-2-format->rdmb-fleece",
        "getfd", "nbd-server-start",
        "block-export-add rdmb-export", "block-export-add rdmb-export",
    ]
    scratch = {a["backing"]: a["node-name"] for a in monitor.arguments("blockdev-add")}
    assert set(scratch) == set(NODES.values())
    (tx,) = monitor.arguments("transaction")
    add, merge = tx["actions"][0]["data"], tx["actions"][1]["data"]
    assert add["node"] == scratch["libvirt-1-format"] and add["name"] == TEMP_BITMAP
    assert add["disabled"] is True and add["persistent"] is False
    assert merge["bitmaps"] == [{"node": "libvirt-1-format", "name": CHAIN_BITMAP}]
    exports = {a["name"]: a for a in monitor.arguments("block-export-add")}
    assert exports["vdb"]["node-name"] == scratch["libvirt-1-format"]
    assert exports["vdb"]["bitmaps"] == [TEMP_BITMAP] and "bitmaps" not in exports["vdc"]
    assert not any(e["writable"] for e in exports.values())

    path = str(tmp_path / "nbd.sock")
    assert handle.uris == {d: f"nbd+unix:///{d}?socket={path}" for d in NODES}
    assert handle.bitmap_context == f"qemu:dirty-bitmap:{TEMP_BITMAP}"
    assert [d.dirty_since for d in handle.disks] == ["B1", None]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_teardown_undoes_everything_in_reverse(tmp_path: Path) -> None:
    monitor = FakeMonitor()
    undo = _Teardown()
    start(monitor, tmp_path, undo)
    before = len(monitor.steps())

    assert undo.run() is None
    assert monitor.steps()[before:] == [
        "block-export-del rdmb-export", "block-export-del rdmb-export", "nbd-server-stop",
        "block-dirty-bitmap-remove rdmb-fleece",
        *FLEECE_DOWN, *FLEECE_DOWN,
    ]
    assert [a["id"] for a in monitor.arguments("block-export-del")] == [
        f"rdmb-export-vdc-{TOKEN}", f"rdmb-export-vdb-{TOKEN}"]
    assert monitor.jobs == {}
    assert os.listdir(tmp_path) == []  # socket, scratch directory and images gone


def test_the_point_is_lost_when_a_fleecing_job_ends(tmp_path: Path) -> None:
    monitor = FakeMonitor()
    handle = start(monitor, tmp_path, _Teardown())
    handle.check()
    monitor.emit_job("rdmb-fleecejob-vdc", {"status": "concluded", "error": "Input/output error"})
    with pytest.raises(OperationError, match="fleecejob-vdc-.* is concluded: Input/output error"):
        handle.check()


def test_a_foreign_nbd_server_fails_the_export_and_everything_goes(tmp_path: Path) -> None:
    monitor = FakeMonitor()
    monitor.fail("nbd-server-start", "NBD server already running")
    undo = _Teardown()
    with pytest.raises(OperationError, match="already runs an NBD server"):
        start(monitor, tmp_path, undo)

    assert undo.run() is None
    steps = monitor.steps()
    assert steps[steps.index("nbd-server-start"):] == [
        "nbd-server-start", "closefd", "block-dirty-bitmap-remove rdmb-fleece",
        *FLEECE_DOWN, *FLEECE_DOWN,
    ]
    assert "block-export-add rdmb-export" not in steps and "nbd-server-stop" not in steps
    assert os.listdir(tmp_path) == []


def test_every_teardown_step_runs_and_the_first_failure_is_kept(tmp_path: Path) -> None:
    monitor = FakeMonitor()
    undo = _Teardown()
    start(monitor, tmp_path, undo)
    monitor.fail("nbd-server-stop", "server is busy")
    monitor.fail("blockdev-del", "Node is in use", times=1)

    failed = undo.run()
    assert isinstance(failed, OperationError) and "server is busy" in str(failed)
    steps = monitor.steps()
    assert steps.count("blockdev-del rdmb-fleece") == 2  # the other disk's still went
    assert steps.count("remove-fd") == 2 and monitor.jobs == {}
    assert os.listdir(tmp_path) == []


def test_the_export_uses_the_socket_root_when_no_socket_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = FakeMonitor()
    monkeypatch.setattr(export_mod, "SOCKET_ROOT", str(tmp_path / "run"))
    undo = _Teardown()
    setup = _Setup("dom", "uuid-1", disks()[:1], NODES, {}, {}, TOKEN, TEMP_BITMAP, None, None,
                   str(tmp_path))
    handle = _start(monitor, setup, undo)
    assert handle.socket is not None
    assert os.path.dirname(os.path.dirname(handle.socket)) == str(tmp_path / "run")
    assert stat.S_IMODE(os.stat(os.path.dirname(handle.socket)).st_mode) == 0o700
    assert undo.run() is None
    assert os.listdir(tmp_path / "run") == []
