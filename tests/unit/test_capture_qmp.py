"""The QMP side of a capture, against a scripted monitor: the order of the transaction and
of the break-snapshot filters around the consistency window, the fleecing export a resync
reads, and what is taken away again when a step fails."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from libvirt_rdm_backup.consistency import Window
from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.engine import capture as capture_mod
from libvirt_rdm_backup.engine.capture import Capture, CaptureOptions, capture
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.modes import Compression, Level, WindowMethod
from libvirt_rdm_backup.qemu import fleece as fleece_mod
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.block_copy import Endpoint
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.chunks import ChunkMap
from tests.unit.fake_monitor import FakeMonitor

SIZE = 1024 * 1024
NEW_BITMAP = "rdmb-repo1-daily-20261207T070000Z"
FILTER_UP = ["add-fd", "blockdev-add qcow2 rdmb-fleece",
             "blockdev-add copy-before-write rdmb-cbw"]


def filter_down(node: str) -> list[str]:
    """The break-snapshot filter of a disk on ``node`` taken away, in order."""
    return ["blockdev-del rdmb-access", f"qom-set drive={node}", "blockdev-del rdmb-cbw",
            "blockdev-del rdmb-fleece", "remove-fd"]


class FakeDomain:
    """Stands for a libvirt domain: capture only asks for its connection here."""

    def connect(self) -> object:
        return object()


class FakeSink:
    """Layers as files under ``root``; attaching one to QEMU is noted in the monitor's record."""

    local_files = True
    copy_chunk = 64 << 10

    def __init__(self, root: Path, monitor: FakeMonitor,
                 layer_format: LayerFormat = PLAIN) -> None:
        self.root = root
        self.monitor = monitor
        self.layer_format = layer_format

    def create(self, plan: DiskPlan) -> None:
        self.monitor.note(f"create {plan.disk.target}")

    def attach(self, monitor: Monitor, plan: DiskPlan) -> AbstractContextManager[str]:
        return self._node(plan.disk.target)

    @contextmanager
    def _node(self, disk: str) -> Iterator[str]:
        self.monitor.note(f"attach {disk}")
        try:
            yield f"rdmb-target-{disk}-000000"
        finally:
            self.monitor.note(f"detach {disk}")

    def target(self, plan: DiskPlan) -> str:
        return str(self.root / f"{plan.disk.target}.qcow2")

    def copy_target(self, plan: DiskPlan) -> Endpoint:
        return Endpoint({"driver": "qcow2", "file": {"driver": "file",
                                                     "filename": self.target(plan)}})

    def scratch(self, name: str) -> str:
        return str(self.root / name)


class ParentPoint:
    """Stands for the last backup's point of a disk (a resync builds on its data file and
    compares with its chunk map)."""

    record = SimpleNamespace(chunk_map="vdb.chunks")

    def relative_data_file(self) -> str:
        return "../B1/vdb.qcow2"


@pytest.fixture
def qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeMonitor:
    """A scripted monitor with guest disks vdb and vdc; no qemu-img, a noted window."""
    monitor = FakeMonitor()
    monitor.plug("virtio-disk1", "libvirt-1-format")
    monitor.plug("virtio-disk2", "libvirt-2-format")

    def create(path: str, fmt: str, size: int, backing: str | None = None,
               options: Any = None) -> None:
        Path(path).write_bytes(b"")

    @contextmanager
    def window(dom: Any, *, quiesce: str | None = None, pause: bool = False,
               before: Any = None) -> Iterator[Window]:
        if before is not None:
            before()
        monitor.note(f"window pause={pause}")
        try:
            yield Window(method=WindowMethod.PAUSE if pause else WindowMethod.QMP_TRANSACTION)
        finally:
            monitor.note("window closed")

    monkeypatch.setattr(img, "create", create)
    monkeypatch.setattr(capture_mod, "consistency_window", window)
    monkeypatch.setattr(capture_mod, "is_remote", lambda conn: False)
    monkeypatch.setenv("RDM_BACKUP_SCRATCH_DIR", str(tmp_path))  # local fleecing images
    monkeypatch.setenv("RDM_BACKUP_STALL_TIMEOUT", "5")  # a job left running fails fast
    return monitor


def disk_plan(target: str, node: str, alias: str, level: str = "full") -> DiskPlan:
    disk = RawDisk(target=target, source_kind=SourceKind.BLOCK, device="disk", bus="virtio",
                   alias=alias, source_path=f"/dev/rdmb-{target}", size=SIZE, node_name=node)
    parent = cast(DiskPoint, ParentPoint()) if level == "resync" else None
    return DiskPlan(disk, DataPath.QEMU, Level(level), "test", parent=parent, track=True)


VDB = ("vdb", "libvirt-1-format", "virtio-disk1")
VDC = ("vdc", "libvirt-2-format", "virtio-disk2")


def run(monitor: FakeMonitor, tmp_path: Path, plans: list[DiskPlan],
        parent_maps: dict[str, ChunkMap] | None = None,
        layer_format: LayerFormat = PLAIN) -> Capture:
    return capture(cast(Any, FakeDomain()), True, plans,
                   FakeSink(tmp_path, monitor, layer_format),
                   CaptureOptions(NEW_BITMAP, parent_maps or {}, monitor=monitor))


def test_a_backup_job_reads_the_point_fixed_by_its_filter(qemu: FakeMonitor, tmp_path: Path
                                                          ) -> None:
    qemu.emit_job("rdmb-job-vdb", {"current-progress": 40},
                  {"status": "concluded", "current-progress": 100})
    result = run(qemu, tmp_path, [disk_plan(*VDB)])

    assert qemu.steps() == [
        "#create vdb", "#attach vdb", *FILTER_UP,
        "#window pause=False",
        "transaction block-dirty-bitmap-add libvirt-1-format",
        "qom-set drive=rdmb-cbw",  # the point in time, right after the new bitmap
        "#window closed",
        "blockdev-add snapshot-access rdmb-access",
        "transaction blockdev-backup full rdmb-access->rdmb-target",
        "job-dismiss",
        *filter_down("libvirt-1-format"),
        "#detach vdb",
    ]
    assert qemu.arguments("transaction")[0]["actions"][0]["data"]["name"] == NEW_BITMAP
    job = qemu.arguments("transaction")[1]["actions"][0]["data"]
    assert job["x-perf"]["max-chunk"] == 64 << 10  # all-zero clusters are not stored
    assert result.new_bitmaps == {"vdb": NEW_BITMAP}
    assert [c.files for c in qemu.calls if c.command == "add-fd"] == [1]
    assert list(qemu.devices.values()) == ["libvirt-1-format", "libvirt-2-format"]
    assert qemu.jobs == {}
    assert os.listdir(tmp_path) == []  # the fleecing image was unlinked once QEMU had it


def test_compressed_layers_are_written_by_compressing_jobs(qemu: FakeMonitor,
                                                          tmp_path: Path) -> None:
    qemu.emit_job("rdmb-job-vdb", "concluded")
    run(qemu, tmp_path, [disk_plan(*VDB)], layer_format=LayerFormat(Compression.ZSTD))
    assert qemu.arguments("transaction")[1]["actions"][0]["data"]["compress"] is True
    qemu.emit_job("rdmb-job-vdb", "concluded")
    run(qemu, tmp_path, [disk_plan(*VDB)])
    assert "compress" not in qemu.arguments("transaction")[3]["actions"][0]["data"]


def test_several_filters_go_in_with_the_guest_held(qemu: FakeMonitor, tmp_path: Path) -> None:
    for disk in ("vdb", "vdc"):
        qemu.emit_job(f"rdmb-job-{disk}", "concluded")
    run(qemu, tmp_path, [disk_plan(*VDB), disk_plan(*VDC)])

    steps = qemu.steps()
    held = steps[steps.index("#window pause=True"):steps.index("#window closed") + 1]
    assert held == [
        "#window pause=True",
        "transaction block-dirty-bitmap-add libvirt-1-format"
        " + block-dirty-bitmap-add libvirt-2-format",
        "qom-set drive=rdmb-cbw", "qom-set drive=rdmb-cbw",
        "#window closed",
    ]
    jobs = [s for s in steps if s.startswith("transaction blockdev-backup")]
    assert jobs == ["transaction blockdev-backup full rdmb-access->rdmb-target"
                    " + blockdev-backup full rdmb-access->rdmb-target"]
    assert steps.index(jobs[0]) > steps.index("#window closed")
    assert list(qemu.devices.values()) == ["libvirt-1-format", "libvirt-2-format"]


def test_a_failed_job_drops_the_new_bitmap_and_the_filter(qemu: FakeMonitor, tmp_path: Path
                                                          ) -> None:
    qemu.emit_job("rdmb-job-vdb", {"status": "concluded", "error": "No space left on device"})
    with pytest.raises(OperationError, match="failed: No space left on device"):
        run(qemu, tmp_path, [disk_plan(*VDB)])

    steps = qemu.steps()
    after = steps[steps.index("job-dismiss") + 1:]
    assert after == [
        "job-cancel",  # the job that was started (already gone: ignored)
        "block-dirty-bitmap-remove libvirt-1-format",
        *filter_down("libvirt-1-format"),
        "#detach vdb",
    ]
    assert qemu.arguments("block-dirty-bitmap-remove") == [
        {"node": "libvirt-1-format", "name": NEW_BITMAP}]
    assert list(qemu.devices.values()) == ["libvirt-1-format", "libvirt-2-format"]


def test_a_refused_transaction_leaves_the_guest_device_alone(qemu: FakeMonitor, tmp_path: Path
                                                             ) -> None:
    qemu.fail("transaction", "Dirty bitmap 'x' already exists")
    with pytest.raises(OperationError, match="already exists"):
        run(qemu, tmp_path, [disk_plan(*VDB)])

    assert qemu.steps() == [
        "#create vdb", "#attach vdb", *FILTER_UP,
        "#window pause=False",
        "transaction block-dirty-bitmap-add libvirt-1-format",
        "#window closed",
        "block-dirty-bitmap-remove libvirt-1-format",
        "blockdev-del rdmb-cbw", "blockdev-del rdmb-fleece", "remove-fd",
        "#detach vdb",
    ]
    assert "qom-set" not in qemu.commands()


class Resyncs:
    """Stands for :func:`resync_layer`: notes each call, checks the export, may fail."""

    def __init__(self, monitor: FakeMonitor, fail: bool = False) -> None:
        self.monitor = monitor
        self.fail = fail
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, uri: str, size: int, parent: ChunkMap, layer: str, backing: str,
                 **_kw: Any) -> tuple[ChunkMap, int]:
        self.monitor.note("resync")
        socket_path = uri.partition("?socket=")[2]
        assert os.path.exists(socket_path), "the export's socket is there while it is read"
        self.seen.append((uri, layer, backing))
        if self.fail:
            raise OperationError("NBD I/O failed during resync")
        return ChunkMap.zero(size), 0


@pytest.fixture
def resyncs(qemu: FakeMonitor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Resyncs:
    sockets = tmp_path / "sockets"
    sockets.mkdir()

    def socket_dir(root: str) -> str:  # in place of a directory under /run
        return tempfile.mkdtemp(prefix="rdmb-nbd-", dir=sockets)

    monkeypatch.setattr(fleece_mod, "private_socket_dir", socket_dir)
    fake = Resyncs(qemu)
    monkeypatch.setattr(capture_mod, "resync_layer", fake)
    return fake


EXPORT_UP = ["getfd", "nbd-server-start", "blockdev-add snapshot-access rdmb-access",
             "block-export-add rdmb-export"]
EXPORT_DOWN = ["block-export-del rdmb-export", "nbd-server-stop",
               *filter_down("libvirt-1-format")]


def test_a_resync_reads_a_read_only_export_of_the_filters_point(
        qemu: FakeMonitor, resyncs: Resyncs, tmp_path: Path) -> None:
    plan = disk_plan(*VDB, level="resync")
    result = run(qemu, tmp_path, [plan], {"vdb": ChunkMap.zero(SIZE)})

    assert qemu.steps() == [
        *FILTER_UP,
        "#window pause=False",
        "transaction block-dirty-bitmap-add libvirt-1-format",
        "qom-set drive=rdmb-cbw",
        "#window closed",
        *EXPORT_UP, "#resync", *EXPORT_DOWN,
    ]
    (fdname,) = [a["fdname"] for a in qemu.arguments("getfd")]
    assert [c.files for c in qemu.calls if c.command == "getfd"] == [1]
    assert qemu.arguments("nbd-server-start") == [
        {"addr": {"type": "fd", "data": {"str": fdname}}}]
    (export,) = qemu.arguments("block-export-add")
    (access,) = [a for a in qemu.arguments("blockdev-add") if a["driver"] == "snapshot-access"]
    assert export["node-name"] == access["node-name"] and export["writable"] is False
    ((uri, layer, backing),) = resyncs.seen
    assert uri.startswith(f"nbd+unix:///{export['name']}?socket=")
    assert (layer, backing) == (str(tmp_path / "vdb.qcow2"), "../B1/vdb.qcow2")
    assert result.chunk_maps == {"vdb": ChunkMap.zero(SIZE)}
    assert not os.path.exists(uri.partition("?socket=")[2])  # its directory went too


def test_a_failed_resync_takes_the_export_and_the_filter_away(
        qemu: FakeMonitor, resyncs: Resyncs, tmp_path: Path) -> None:
    resyncs.fail = True
    with pytest.raises(OperationError, match="NBD I/O failed"):
        run(qemu, tmp_path, [disk_plan(*VDB, level="resync")], {"vdb": ChunkMap.zero(SIZE)})

    steps = qemu.steps()
    assert steps[steps.index("#resync") + 1:] == [
        "block-dirty-bitmap-remove libvirt-1-format", *EXPORT_DOWN]
    ((uri, _layer, _backing),) = resyncs.seen
    assert not os.path.exists(os.path.dirname(uri.partition("?socket=")[2]))
    assert list(qemu.devices.values()) == ["libvirt-1-format", "libvirt-2-format"]


def test_an_nbd_server_of_someone_else_fails_the_resync_cleanly(
        qemu: FakeMonitor, resyncs: Resyncs, tmp_path: Path) -> None:
    qemu.fail("nbd-server-start", "NBD server already running")
    with pytest.raises(OperationError, match="already runs an NBD server"):
        run(qemu, tmp_path, [disk_plan(*VDB, level="resync")], {"vdb": ChunkMap.zero(SIZE)})

    steps = qemu.steps()
    assert steps[steps.index("nbd-server-start"):] == [
        "nbd-server-start", "closefd",  # the socket handed over is taken back
        "block-dirty-bitmap-remove libvirt-1-format",
        "qom-set drive=libvirt-1-format",
        "blockdev-del rdmb-cbw", "blockdev-del rdmb-fleece", "remove-fd",
    ]
    assert "nbd-server-stop" not in steps  # not ours to stop
    assert resyncs.seen == []
    assert os.listdir(tmp_path / "sockets") == []
