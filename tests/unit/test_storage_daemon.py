"""The private qemu-storage-daemon: QMP, events, errors, and a life tied to the tool's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import OperationError, QmpError
from libvirt_rdm_backup.qemu import storage_daemon
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon is not installed")
MiB = 1 << 20


def gone(pid: int, timeout: float = 10) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
                if stream.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def test_commands_errors_and_a_clean_quit() -> None:
    with StorageDaemon("unit") as daemon:
        pid = daemon.pid
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--chardev" in argv and len([a for a in argv if a]) == 5  # a socket, no more
        assert daemon.execute("query-version")["qemu"]["major"] >= 7
        with pytest.raises(QmpError) as err:
            daemon.execute("blockdev-del", {"node-name": "nothing"})
        assert err.value.command == "blockdev-del" and err.value.error_class == "GenericError"
        assert "nothing" in str(err.value)
    assert gone(pid)
    with pytest.raises(OperationError, match="not running"):
        daemon.execute("query-version")


def test_jobs_and_exports_are_awaited_through_events(tmp_path: Path) -> None:
    image = tmp_path / "src.img"
    with open(image, "wb") as stream:
        stream.truncate(64 * MiB)
    with StorageDaemon("unit") as daemon:
        daemon.execute("blockdev-add", {"driver": "raw", "node-name": "src", "file": {
            "driver": "file", "filename": str(image)}})
        daemon.execute("blockdev-add", {"driver": "null-co", "node-name": "dst",
                                        "size": 64 * MiB})
        daemon.execute("blockdev-backup", {"job-id": "copy", "device": "src", "target": "dst",
                                           "sync": "full", "auto-dismiss": False})
        daemon.wait_job("copy", 30)
        [job] = daemon.execute("query-jobs")
        assert job["status"] == "concluded" and job["current-progress"] == 64 * MiB
        daemon.execute("job-dismiss", {"id": "copy"})
        daemon.wait_job("copy", 5)  # a job that is gone has ended

        daemon.execute("nbd-server-start", {"addr": {"type": "unix", "data": {
            "path": str(tmp_path / "nbd.sock")}}})
        daemon.execute("block-export-add", {"type": "nbd", "id": "exp", "node-name": "src",
                                            "name": "x"})
        daemon.execute("block-export-del", {"id": "exp"})
        daemon.wait_export_deleted("exp", 10)
        assert daemon.execute("query-block-exports") == []


def test_a_wait_that_runs_out_is_an_operation_error(tmp_path: Path) -> None:
    with StorageDaemon("unit") as daemon:
        daemon.execute("blockdev-add", {"driver": "null-co", "node-name": "src",
                                        "size": 1 << 40, "latency-ns": 10**9})
        daemon.execute("blockdev-add", {"driver": "null-co", "node-name": "dst",
                                        "size": 1 << 40})
        daemon.execute("blockdev-backup", {"job-id": "slow", "device": "src", "target": "dst",
                                           "sync": "full"})
        with pytest.raises(OperationError, match="did not complete within"):
            daemon.wait_job("slow", 0.5)
        daemon.execute("job-cancel", {"id": "slow"})
        daemon.wait_job("slow", 30)


def test_a_daemon_that_cannot_start_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_daemon, "require_tool", lambda _name: "/bin/false")
    with pytest.raises(OperationError, match="exited with status 1 before it connected"):
        StorageDaemon("unit").start()


CHILD = """
import os, signal, sys
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon
daemon = StorageDaemon("unit").start()
print(daemon.pid, flush=True)
signal.pause()
"""


def test_the_daemon_dies_with_the_tool_even_by_sigkill(tmp_path: Path) -> None:
    """... and leaves nothing behind: its private directory went once it connected."""
    tool = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert tool.stdout is not None
    pid = int(tool.stdout.readline())
    assert not gone(pid, 0.2)
    tool.send_signal(signal.SIGKILL)
    tool.wait()
    assert gone(pid)
    assert list(tmp_path.iterdir()) == []
