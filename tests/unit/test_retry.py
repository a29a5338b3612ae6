"""Retry and wait-until policies: what they wait, how long, and the error they end with.

Time is a fake clock: ``time.sleep`` advances ``time.monotonic`` (tenacity reads both),
so a policy's whole timeout passes at once and its pauses can be counted.
"""

from __future__ import annotations

import ast
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tenacity import RetryError

from libvirt_rdm_backup import events, retry
from libvirt_rdm_backup.engine.export import _remove_export
from libvirt_rdm_backup.errors import CommandError, OperationError, StorageError, UsageError
from libvirt_rdm_backup.qemu.jobs import cancel_jobs, wait_jobs

PACKAGE = Path(__file__).resolve().parents[2] / "libvirt_rdm_backup"


class FakeClock:
    """``time.monotonic`` that only ``time.sleep`` moves; the pauses asked for are kept."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    monkeypatch.setattr(time, "sleep", fake.sleep)
    yield fake


def answers(*values: Any) -> Callable[[], Any]:
    """An attempt returning ``values`` one per call, then the last one for ever."""
    seen: list[Any] = []

    def attempt() -> Any:
        value = values[min(len(seen), len(values) - 1)]
        seen.append(value)
        return value

    return attempt


# -- generic waits -----------------------------------------------------------------------------


def test_until_returns_the_first_true_answer(clock: FakeClock) -> None:
    assert retry.until(10, 0.5, "never")(answers(None, 0, "", "ready")) == "ready"
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_until_ends_with_the_projects_error_never_tenacitys(clock: FakeClock) -> None:
    with pytest.raises(UsageError, match="^it did not come$") as caught:
        retry.until(2, 0.5, "it did not come", UsageError)(answers(False))
    assert not isinstance(caught.value, RetryError)
    assert clock.now - 1000.0 == 2.0 and len(clock.sleeps) == 4


def test_an_error_that_is_not_retried_is_raised_at_once(clock: FakeClock) -> None:
    def broken() -> bool:
        raise StorageError("the array said no")

    with pytest.raises(StorageError, match="the array said no"):
        retry.until(10, 0.1, "never")(broken)
    assert clock.sleeps == []


def test_poll_says_whether_it_ended_by_itself(clock: FakeClock) -> None:
    assert retry.poll(5, 1)(answers(False, True)) is True
    assert retry.poll(5, 1)(answers(False)) is False
    assert retry.serve_until_stopped(None)(answers(False, False, True)) is True
    assert clock.sleeps[-2:] == [retry.SERVE_POLL, retry.SERVE_POLL]


def test_every_pause_is_logged_at_debug(clock: FakeClock, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    with caplog.at_level(logging.DEBUG, logger="libvirt_rdm_backup.retry"):
        retry.until(5, 1, "never")(answers(False, True))
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert caplog.records[0].getMessage().endswith("in 1 seconds as it returned False.")


# -- QEMU --------------------------------------------------------------------------------------


def test_jobs_are_polled_fast_first_then_at_most_every_poll(clock: FakeClock) -> None:
    assert retry.job_wait(0.1)(answers(*[False] * 7, True)) is True
    assert clock.sleeps == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


class ExportsMonitor:
    """A monitor whose NBD export goes away after ``lingers`` looks (never, for None)."""

    def __init__(self, lingers: int | None) -> None:
        self.lingers = lingers
        self.looks = 0
        self.commands: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.commands.append(command)
        if command != "query-block-exports":
            return {}
        self.looks += 1
        gone = self.lingers is not None and self.looks > self.lingers
        return [] if gone else [{"id": "rdmb-x"}]


def test_a_removed_export_is_waited_for(clock: FakeClock) -> None:
    monitor = ExportsMonitor(lingers=3)
    _remove_export(monitor, "rdmb-x")  # type: ignore[arg-type]
    assert monitor.commands[0] == "block-export-del" and monitor.looks == 4
    assert clock.sleeps == [retry.EXPORT_POLL] * 3


def test_an_export_that_stays_is_given_up_after_the_qmp_timeout(
        clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDM_BACKUP_QMP_TIMEOUT", "7")
    with pytest.raises(OperationError, match="^NBD export rdmb-x did not go away within 7 s$"):
        _remove_export(ExportsMonitor(lingers=None), "rdmb-x")  # type: ignore[arg-type]
    assert 7.0 <= clock.now - 1000.0 <= 7.0 + retry.EXPORT_POLL * 1.01


class JobsMonitor:
    """query-jobs answers: job0 in ``status`` (for ever); cancel and dismiss are noted."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.commands: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.commands.append(command)
        if command == "query-jobs":
            return [{"id": "job0", "status": self.status, "current-progress": 1,
                     "total-progress": 2}]
        return {}


def test_cancelled_jobs_that_stay_are_left_after_the_qmp_timeout(
        clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RDM_BACKUP_QMP_TIMEOUT", "3")
    with caplog.at_level(logging.INFO):
        cancel_jobs(JobsMonitor("running"), ["job0"])  # type: ignore[arg-type]
    assert 3.0 <= clock.now - 1000.0 <= 3.0 + retry.JOB_CANCEL_POLL * 1.01
    assert "jobs job0 did not stop within 3 s (the next run removes them)" in caplog.text


def test_cancelled_jobs_that_conclude_are_dismissed_at_once(clock: FakeClock) -> None:
    monitor = JobsMonitor("concluded")
    cancel_jobs(monitor, ["job0"])  # type: ignore[arg-type]
    assert monitor.commands == ["job-cancel", "query-jobs", "job-dismiss"]
    assert clock.sleeps == []


def test_waiting_for_no_job_asks_nothing(clock: FakeClock) -> None:
    monitor = JobsMonitor("running")
    assert wait_jobs(monitor, []) == []  # type: ignore[arg-type]
    assert monitor.commands == []


def test_a_server_socket_that_never_comes_names_the_tool(clock: FakeClock) -> None:
    with pytest.raises(CommandError, match="^qemu-nbd failed: no socket /s after 30 s$"):
        retry.socket_wait(["qemu-nbd", "-k", "/s"], "/s", 30)(answers(False))


def test_a_job_that_does_not_stop_is_an_error(clock: FakeClock) -> None:
    with pytest.raises(OperationError, match="^QEMU job j1 did not stop within 30 s$"):
        retry.job_stop("j1", 30)(answers(False))


# -- host --------------------------------------------------------------------------------------


def test_a_held_flock_is_waited_for_then_given_up(clock: FakeClock) -> None:
    calls: list[int] = []

    def busy() -> int:
        calls.append(1)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    with pytest.raises(OperationError, match="^/x stays locked by another process$") as caught:
        retry.flock_wait("/x", 5)(busy)
    assert isinstance(caught.value.__cause__, BlockingIOError)
    assert 5.0 <= clock.now - 1000.0 <= 5.0 + retry.FLOCK_POLL * 1.01 and len(calls) > 100


def test_a_file_renamed_away_is_opened_again(clock: FakeClock) -> None:
    assert retry.flock_wait("/x", 5)(answers(None, None, 7)) == 7


def test_an_event_file_locked_by_another_process_is_an_error(
        clock: FakeClock, tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    holder = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: it conflicts
        with pytest.raises(OperationError, match="stays locked by another process"):
            events._open_locked(path)
        assert clock.now - 1000.0 >= events.LOCK_TIMEOUT
        fcntl.flock(holder, fcntl.LOCK_UN)
        fd = events._open_locked(path)
        os.close(fd)
    finally:
        os.close(holder)


def test_tid_allocation_tries_again_then_names_the_last_refusal(clock: FakeClock) -> None:
    tried: list[int] = []

    def taken() -> int:
        tried.append(len(tried) + 1)
        try:
            raise StorageError(f"tid {len(tried)} is taken")
        except StorageError as err:
            raise retry.Again() from err

    with pytest.raises(StorageError, match="^cannot create tgt target iqn.x: tid 3 is taken$"):
        retry.tgt_tid_allocation("iqn.x", 3)(taken)
    assert tried == [1, 2, 3] and clock.sleeps == [0.0, 0.0]


def test_lease_claim_waits_what_the_attempt_asks_then_gives_up(clock: FakeClock) -> None:
    delays = iter([2.5, 0.0, 1.0, 9.0])

    def contested() -> None:
        raise retry.Again(next(delays))

    with pytest.raises(OperationError, match="^NBD volume nbd://h/v: cannot take the writer "
                       "lease: its table of contents keeps changing"):
        retry.lease_claim("nbd://h/v", 4)(contested)
    assert clock.sleeps == [2.5, 0.0, 1.0]


def test_the_window_watchdog_tries_quickly_then_slowly_until_it_lingered(
        clock: FakeClock) -> None:
    assert retry.window_repair(60)(answers(False)) is False
    quick = [retry.WINDOW_QUICK_EVERY] * (retry.WINDOW_QUICK - 1)
    assert clock.sleeps[:retry.WINDOW_QUICK] == [*quick, retry.WINDOW_SLOW_EVERY]
    assert set(clock.sleeps[retry.WINDOW_QUICK - 1:]) == {retry.WINDOW_SLOW_EVERY}
    assert 60 <= clock.now - 1000.0 < 60 + retry.WINDOW_SLOW_EVERY
    assert retry.window_repair(60)(answers(False, False, True)) is True


# -- no hand-written retry loops -----------------------------------------------------------------

# A pause inside a loop is a retry or a poll: it belongs in a policy of libvirt_rdm_backup.retry.
# Allowed: files being rewritten elsewhere, to be converted next.
ALLOWED_FILES: set[str] = set()


def _is_sleep(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return ((isinstance(func, ast.Attribute) and func.attr == "sleep")
            or (isinstance(func, ast.Name) and func.id == "sleep"))


def _loop_pauses(source: str) -> list[int]:
    """Lines of sleep calls inside ``while`` or ``for`` loops (of one function: a function
    defined in a loop's body is not looked into)."""
    found: set[int] = set()

    def visit(node: ast.AST, in_loop: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False)
            elif isinstance(child, ast.While | ast.For | ast.AsyncFor):
                visit(child, True)
            else:
                if in_loop and _is_sleep(child):
                    found.add(child.lineno)  # type: ignore[attr-defined]
                visit(child, in_loop)

    visit(ast.parse(source), False)
    return sorted(found)


def test_the_loop_check_finds_pauses_in_loops() -> None:
    assert _loop_pauses("import time\nwhile True:\n    time.sleep(1)\n") == [3]
    assert _loop_pauses("for _ in range(3):\n    if x:\n        sleep(0.1)\n") == [3]
    assert _loop_pauses("while a:\n    def f():\n        time.sleep(1)\n") == []
    assert _loop_pauses("def f():\n    time.sleep(1)\n") == []


def test_no_hand_written_retry_or_poll_loops_in_the_package() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name in ALLOWED_FILES:
            continue
        offenders += [f"{name}:{line}" for line in _loop_pauses(path.read_text())]
    assert offenders == [], ("sleep inside a loop: use a policy of libvirt_rdm_backup.retry: "
                             + ", ".join(offenders))
