"""The watchdog runs as root: its code comes from the installed package, never from the
directory the tool was started in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_rdm_backup import watchdog


@pytest.mark.hostile
def test_a_planted_module_in_the_working_directory_is_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "libvirt_rdm_backup"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    ran = tmp_path / "planted-code-ran"
    (planted / "watchdog.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    dog = watchdog.start("test:///default", "00000000-0000-0000-0000-000000000000",
                         str(tmp_path / "windows"), str(tmp_path / "locks"))
    assert dog is not None
    try:
        dog.wait_ready()  # the real watchdog answers (or gives up) once it has started
    finally:
        dog.stop()
        if dog.proc.poll() is None:
            dog.proc.kill()
        dog.proc.wait()
    assert not ran.exists(), "the watchdog ran code from the working directory"


def test_a_tool_gone_before_the_watchdog_is_ready_gets_no_traceback(tmp_path: Path) -> None:
    """A backup refused before any window ends while its watchdog still starts: the
    watchdog's "ready" goes to a closed pipe, and nothing but quiet follows."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the tool is gone
    config = {"uri": "test:///default", "uuid": "00000000-0000-0000-0000-000000000000",
              "marker_dir": str(tmp_path / "windows"), "lock_dir": str(tmp_path / "locks")}
    proc = subprocess.run([sys.executable, "-P", "-m", "libvirt_rdm_backup.watchdog"],
                          input=(json.dumps(config) + "\n").encode(), stdout=write_end,
                          stderr=subprocess.PIPE, timeout=60, check=False)
    os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr and proc.stderr == b""
