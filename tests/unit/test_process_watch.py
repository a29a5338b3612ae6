"""Child processes: killed when they stall, and never outliving the tool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import CommandError
from libvirt_rdm_backup.process import io_counter, run, stall_timeout


def test_a_silent_child_is_killed_as_stalled() -> None:
    start = time.monotonic()
    with pytest.raises(CommandError, match="made no progress for 1.5 s"):
        run(["sleep", "30"], stall=1.5)
    assert time.monotonic() - start < 10


def test_a_busy_child_is_not_stalled() -> None:
    # reads and writes all the time for ~3 s, longer than the stall limit
    busy = ("import os, time\n"
            "end = time.monotonic() + 3\n"
            "with open(os.devnull, 'wb') as sink:\n"
            "    while time.monotonic() < end:\n"
            "        sink.write(bytes(65536))\n"
            "print('done')\n")
    proc = run([sys.executable, "-c", busy], stall=1.0)
    assert proc.stdout == "done\n"


def test_timeout_and_output() -> None:
    with pytest.raises(CommandError, match="timed out after 0.5 s"):
        run(["sleep", "5"], timeout=0.5)
    proc = run(["cat"], input_text="hello")
    assert proc.stdout == "hello"
    with pytest.raises(CommandError, match="boom"):
        run(["sh", "-c", "echo boom >&2; exit 3"])


def test_io_counter_and_stall_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert io_counter(os.getpid()) is not None
    assert io_counter(2**22 + 12345) is None
    monkeypatch.setenv("RDM_BACKUP_STALL_TIMEOUT", "7")
    assert stall_timeout() == 7
    for bad in ("x", "-1", "0"):
        monkeypatch.setenv("RDM_BACKUP_STALL_TIMEOUT", bad)
        assert stall_timeout() == 120


def test_children_die_with_the_tool(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = (
        "import subprocess, sys\n"
        "from libvirt_rdm_backup import process\n"
        f"process.run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 60'], stall=600)\n"
    )
    tool = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(pidfile.read_text())
        tool.send_signal(signal.SIGKILL)
        tool.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and _state(child) != "Z":
            assert time.monotonic() < deadline, "the child outlived the killed tool"
            time.sleep(0.05)
    finally:
        tool.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
