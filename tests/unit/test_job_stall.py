"""Waiting for QEMU jobs: progress ends the wait normally, a stuck job is given up."""

from __future__ import annotations

from typing import Any

import pytest

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.qemu.jobs import wait_jobs
from libvirt_rdm_backup.qemu.nbd_io import _wait_for


class ScriptedMonitor:
    """Answers query-jobs from a script of progress values, one per poll."""

    def __init__(self, progress: list[int], total: int = 100) -> None:
        self.progress = progress
        self.total = total
        self.polls = 0
        self.dismissed: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "job-dismiss":
            assert arguments is not None
            self.dismissed.append(arguments["id"])
            return {}
        assert command == "query-jobs"
        current = self.progress[min(self.polls, len(self.progress) - 1)]
        self.polls += 1
        status = "concluded" if current >= self.total else "running"
        return [{"id": "job0", "status": status, "current-progress": current,
                 "total-progress": self.total}]


def test_a_progressing_job_is_waited_for() -> None:
    monitor = ScriptedMonitor([0, 10, 20, 50, 100])
    results = wait_jobs(monitor, ["job0"], poll=0.001, stall=0.5)  # type: ignore[arg-type]
    assert [r.status for r in results] == ["concluded"] and monitor.dismissed == ["job0"]


def test_a_stuck_job_is_given_up() -> None:
    monitor = ScriptedMonitor([0, 10, 10])  # stays at 10 forever
    with pytest.raises(OperationError, match="job0 made no progress for 0.2 s"):
        wait_jobs(monitor, ["job0"], poll=0.01, stall=0.2)  # type: ignore[arg-type]
    assert monitor.polls > 3


class SilentExport:
    """An NBD handle whose reads complete after ``polls`` polls (never, for None)."""

    def __init__(self, polls: int | None) -> None:
        self.polls = polls
        self.seen = 0

    def aio_command_completed(self, _cookie: int) -> bool:
        return self.polls is not None and self.seen >= self.polls

    def poll(self, _timeout_ms: int) -> int:
        self.seen += 1
        return 0  # nothing happened within the timeout


def test_export_reads_give_up_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDM_BACKUP_STALL_TIMEOUT", "0.05")
    _wait_for(SilentExport(polls=3), 1, 0)  # answered after three quiet polls, within the limit
    with pytest.raises(OperationError, match="offset 4096 made no progress for 0.05 s"):
        _wait_for(SilentExport(polls=None), 1, 4096)


def test_a_monitor_command_without_an_answer_is_given_up(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import threading

    import libvirt_qemu

    from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor, qmp_timeout

    held = threading.Event()
    calls: list[str] = []

    def never_answers(dom: object, text: str, flags: int) -> str:
        calls.append(text)
        held.wait(30)  # released at the end of the test
        return '{"return": {}}'

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", never_answers)
    monkeypatch.setenv("RDM_BACKUP_QMP_TIMEOUT", "0.2")
    try:
        with pytest.raises(OperationError, match="QEMU did not answer query-jobs within 0.2 s"):
            LibvirtMonitor(object()).execute("query-jobs")  # type: ignore[arg-type]
        assert calls and "query-jobs" in calls[0]
    finally:
        held.set()
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand",
                        lambda dom, text, flags: '{"return": {"ok": 1}}')
    assert LibvirtMonitor(object()).execute("query-status") == {"ok": 1}  # type: ignore[arg-type]
    monkeypatch.setenv("RDM_BACKUP_QMP_TIMEOUT", "nonsense")
    monkeypatch.setenv("RDM_BACKUP_STALL_TIMEOUT", "7")
    assert qmp_timeout() == 7


def test_a_libvirt_failure_in_the_worker_reaches_the_caller(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import libvirt
    import libvirt_qemu

    from libvirt_rdm_backup.errors import LibvirtError
    from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor

    def refuses(dom: object, text: str, flags: int) -> str:
        raise libvirt.libvirtError("domain is not running")

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", refuses)
    with pytest.raises(LibvirtError, match="QMP query-block failed"):
        LibvirtMonitor(object()).execute("query-block")  # type: ignore[arg-type]
