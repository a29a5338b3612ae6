"""Copies as block jobs of a storage daemon: the QMP side through a scripted daemon (commands in
order, progress, cancel on a stall, a deadline, an error or an interrupt, cleanup in reverse),
and a real qemu-storage-daemon copying sparsely, at the speed asked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.errors import OperationError, QmpError, UsageError
from libvirt_rdm_backup.qemu.block_copy import (
    CopyDeadlineError,
    Endpoint,
    block_copy,
    bwlimit_speed,
    copy_image,
    fd_target,
    raw_source,
)
from tests.unit.fake_monitor import FakeMonitor, short

MiB = 1 << 20
TLS = {"qom-type": "tls-creds-x509", "id": "rdmb-tls", "dir": "/etc/pki/x", "endpoint": "client"}


class FakeDaemon(FakeMonitor):
    """A scripted storage daemon: ``blockdev-mirror`` starts a job; :meth:`watch_job` looks at
    ``query-jobs`` after a short pause (standing in for an event or the look's timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.on("blockdev-mirror", self._mirror)

    def _mirror(self, args: dict[str, Any]) -> dict[str, Any]:
        job_id = str(args["job-id"])
        self.jobs[job_id] = {"id": job_id, "type": "mirror", "status": "running",
                             "current-progress": 0, "total-progress": 64 * MiB}
        return {}

    def watch_job(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        time.sleep(min(timeout, 0.005))
        return next((job for job in self.execute("query-jobs") if job["id"] == job_id), None)


def steps(daemon: FakeDaemon) -> list[str]:
    out = []
    for call in daemon.calls:
        if call.command in ("query-jobs",):
            continue
        if call.command == "blockdev-mirror":
            out.append(f"blockdev-mirror {short(call.arguments['device'])}->"
                       f"{short(call.arguments['target'])}")
        elif call.command in ("object-add", "object-del"):
            out.append(f"{call.command} {call.arguments['id']}")
        else:
            out.append(_short_step(call.command, call.arguments))
    return out


def _short_step(command: str, args: dict[str, Any]) -> str:
    if command == "blockdev-add":
        return f"blockdev-add {args['driver']} {short(args['node-name'])}"
    if command == "blockdev-del":
        return f"blockdev-del {short(args['node-name'])}"
    if command.startswith("job-"):
        return f"{command} {short(args['id'])}"
    return command


SOURCE = Endpoint(raw_source("/dev/sdz", size=64 * MiB))
TARGET = Endpoint({"driver": "qcow2", "backing": None,
                   "file": {"driver": "file", "filename": "/staging/vdb.qcow2"}}, objects=(TLS,))
DONE = ["blockdev-del rdmb-dst", "blockdev-del rdmb-src", "object-del rdmb-tls"]


def test_a_copy_runs_its_commands_in_order_and_reports_progress() -> None:
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", {"current-progress": 16 * MiB},
                    {"current-progress": 48 * MiB},
                    {"status": "ready", "current-progress": 64 * MiB}, "concluded")
    seen: list[tuple[int, int]] = []
    block_copy(daemon, SOURCE, TARGET, "vdb", speed=5 * MiB,
               progress=lambda _job, done, total: seen.append((done, total)))
    assert steps(daemon) == [
        "object-add rdmb-tls", "blockdev-add raw rdmb-src", "blockdev-add qcow2 rdmb-dst",
        "blockdev-mirror rdmb-src->rdmb-dst", "job-complete rdmb-copy",
        "job-dismiss rdmb-copy", *DONE]
    source, target = daemon.arguments("blockdev-add")
    assert source["read-only"] is True and source["file"] == {
        "driver": "host_device", "filename": "/dev/sdz", "locking": "off"}
    assert source["size"] == 64 * MiB
    assert target["detect-zeroes"] == "unmap" and target["discard"] == "unmap"
    assert target["backing"] is None and "read-only" not in target
    mirror = daemon.arguments("blockdev-mirror")[0]
    assert mirror["sync"] == "full" and mirror["speed"] == 5 * MiB
    assert mirror["auto-dismiss"] is False
    assert seen[0] == (16 * MiB, 64 * MiB) and seen[-1] == (64 * MiB, 64 * MiB)
    assert sorted(seen) == seen
    assert daemon.jobs == {}


def test_no_speed_means_no_limit() -> None:
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", "concluded")
    block_copy(daemon, SOURCE, Endpoint(TARGET.node), "vdb")
    assert "speed" not in daemon.arguments("blockdev-mirror")[0]
    assert "object-add" not in daemon.commands()


def test_a_stalled_copy_is_cancelled_and_everything_removed() -> None:
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", {"current-progress": 8 * MiB})  # and then nothing moves
    started = time.monotonic()
    with pytest.raises(OperationError, match=r"^copy of vdb made no progress for 0.3 s "
                       r"\(is the storage answering\?\)$"):
        block_copy(daemon, SOURCE, TARGET, "vdb", stall=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert steps(daemon)[4:] == ["job-cancel rdmb-copy", "job-dismiss rdmb-copy", *DONE]
    assert daemon.jobs == {}


def test_a_copy_reaching_its_deadline_is_cancelled() -> None:
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", *({"current-progress": n * MiB} for n in range(1, 10000)))
    with pytest.raises(CopyDeadlineError, match="^copy of vdb did not finish in time$"):
        block_copy(daemon, SOURCE, TARGET, "vdb", deadline=time.monotonic() + 0.2, stall=60)
    assert steps(daemon)[4:] == ["job-cancel rdmb-copy", "job-dismiss rdmb-copy", *DONE]


def test_a_failed_job_is_reported_and_cleaned_up_without_a_cancel() -> None:
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", {"status": "concluded", "error": "Input/output error"})
    with pytest.raises(OperationError, match="^copy of vdb failed: Input/output error$"):
        block_copy(daemon, SOURCE, TARGET, "vdb")
    assert steps(daemon)[4:] == ["job-dismiss rdmb-copy", *DONE]


def test_an_interrupt_cancels_the_job_and_removes_the_nodes() -> None:
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", {"current-progress": MiB})

    def interrupted(_job: str, _done: int, _total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        block_copy(daemon, SOURCE, TARGET, "vdb", progress=interrupted)
    assert steps(daemon)[4:] == ["job-cancel rdmb-copy", "job-dismiss rdmb-copy", *DONE]


def test_a_refused_target_removes_what_was_added_before_it() -> None:
    daemon = FakeDaemon()
    daemon.fail("blockdev-add", "Could not open '/staging/vdb.qcow2': Permission denied",
                when=lambda args: str(args["node-name"]).startswith("rdmb-dst-"))
    with pytest.raises(QmpError, match="Permission denied"):
        block_copy(daemon, SOURCE, TARGET, "vdb")
    assert steps(daemon) == ["object-add rdmb-tls", "blockdev-add raw rdmb-src",
                             "blockdev-add qcow2 rdmb-dst", "blockdev-del rdmb-src",
                             "object-del rdmb-tls"]


def test_a_job_that_does_not_stop_is_left_to_the_daemon_quit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDM_BACKUP_QMP_TIMEOUT", "0.3")
    daemon = FakeDaemon()
    daemon.emit_job("rdmb-copy-vdb", {"current-progress": MiB})
    daemon.on("job-cancel", {})  # QEMU accepts, but the job hangs on its storage
    with pytest.raises(OperationError, match="no progress"):
        block_copy(daemon, SOURCE, TARGET, "vdb", stall=0.2)
    assert steps(daemon)[4:] == ["job-cancel rdmb-copy", *DONE]


def test_bwlimit_is_a_positive_number_of_mib_per_second() -> None:
    assert bwlimit_speed(None) == 0
    assert bwlimit_speed(10) == 10 * MiB and bwlimit_speed(0.5) == MiB // 2
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(UsageError, match="^--bwlimit must be a positive number of MiB/s"):
            bwlimit_speed(bad)


def test_raw_sources() -> None:
    assert raw_source("iscsi://127.0.0.1:3260/iqn.2026-01.x:t/1", 4096, MiB) == {
        "driver": "raw", "offset": 4096, "size": MiB,
        "file": {"driver": "iscsi", "transport": "tcp", "portal": "127.0.0.1:3260",
                 "target": "iqn.2026-01.x:t", "lun": 1}}
    assert raw_source("/var/lib/x,y.img")["file"] == {
        "driver": "file", "filename": "/var/lib/x,y.img", "locking": "off"}
    assert fd_target(7, True, MiB) == Endpoint(
        {"driver": "raw", "size": MiB, "file": {"driver": "host_device",
                                                "filename": "/dev/fd/7"}}, fd=7)


# -- a real daemon ---------------------------------------------------------------------------

needs_qsd = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                               or shutil.which("qemu-io") is None,
                               reason="qemu-storage-daemon and qemu-io are needed")


def _data_extents(path: Path, fmt: str) -> list[tuple[int, int]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(path)],
                         check=True, capture_output=True, text=True).stdout
    merged: list[tuple[int, int]] = []
    for extent in json.loads(out):
        if not extent["data"]:
            continue
        if merged and sum(merged[-1]) == extent["start"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + extent["length"])
        else:
            merged.append((extent["start"], extent["length"]))
    return merged


@needs_qsd
def test_a_sparse_raw_source_leaves_a_sparse_qcow2_and_a_sparse_file(tmp_path: Path) -> None:
    source = tmp_path / "lun.raw"
    with open(source, "wb") as stream:
        stream.truncate(64 * MiB)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 2M", "-c",
                    "write -P 0 20M 4M", "-c", "write -P 0x66 40M 1M", str(source)],
                   check=True, capture_output=True)
    layer = tmp_path / "vdb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(layer), "64M"], check=True)
    copy_image(Endpoint(raw_source(str(source), size=64 * MiB)),
               Endpoint({"driver": "qcow2", "backing": None,
                         "file": {"driver": "file", "filename": str(layer)}}), "vdb")
    # the written zeros (20M..24M) take no cluster either
    assert _data_extents(layer, "qcow2") == [(MiB, 2 * MiB), (40 * MiB, MiB)]
    restored = tmp_path / "restored.raw"
    fd = os.open(restored, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 64 * MiB)
        copy_image(Endpoint({"driver": "qcow2", "backing": None,
                             "file": {"driver": "file", "filename": str(layer)}}),
                   fd_target(fd, False, 64 * MiB), "vdb")
    finally:
        os.close(fd)
    assert restored.read_bytes() == source.read_bytes()
    assert restored.stat().st_blocks * 512 <= 4 * MiB


@needs_qsd
def test_the_daemon_runs_the_job_at_the_speed_asked(tmp_path: Path) -> None:
    from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

    source = tmp_path / "src.raw"
    with open(source, "wb") as stream:
        stream.write(os.urandom(4 * MiB))
    target = tmp_path / "dst.raw"
    with open(target, "wb") as stream:
        stream.truncate(4 * MiB)
    speeds: list[int] = []
    with StorageDaemon("unit") as daemon:

        def look(_job: str, _done: int, _total: int) -> None:
            speeds.extend(int(job["speed"]) for job in daemon.execute("query-block-jobs"))

        started = time.monotonic()
        block_copy(daemon, Endpoint(raw_source(str(source))),
                   Endpoint({"driver": "raw", "file": {"driver": "file",
                                                       "filename": str(target)}}),
                   "vdb", speed=2 * MiB, progress=look)
        took = time.monotonic() - started
    assert speeds and set(speeds) == {2 * MiB}
    assert took >= 1.0  # 4 MiB at 2 MiB/s: the first chunk goes at once, the rest waits
    assert target.read_bytes() == source.read_bytes()
