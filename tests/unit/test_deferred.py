"""Deferred work of a published backup: threads per key, waited for by key or all, failures
logged, never raised into the next backup."""

from __future__ import annotations

import logging
import threading

import pytest

from libvirt_rdm_backup.engine import deferred


def test_settle_waits_for_the_key_only() -> None:
    gate, done = threading.Event(), []

    def slow() -> None:
        gate.wait(5)
        done.append("vdb")

    deferred.defer("dom/vdb", "slow", slow)
    deferred.defer("dom/vdc", "fast", lambda: done.append("vdc"))
    deferred.settle("dom/vdc")
    assert "vdc" in done and "vdb" not in done
    assert deferred.settle("dom/vdb", timeout=0.05) is False  # still running: kept pending
    gate.set()
    assert deferred.settle() is True
    assert sorted(done) == ["vdb", "vdc"]


def test_a_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("monitor unreachable")

    with caplog.at_level(logging.WARNING, logger=deferred.__name__):
        deferred.defer("dom/vdd", "removing storage snapshot rdmb-x", fail)
        assert deferred.settle("dom/vdd") is True
    assert "removing storage snapshot rdmb-x failed" in caplog.text
    assert "monitor unreachable" in caplog.text


def test_threads_are_not_daemons() -> None:
    """The interpreter waits for them: a command's process ends after its removals."""
    seen: list[bool] = []

    def probe() -> None:
        seen.append(threading.current_thread().daemon)

    deferred.defer("dom/vde", "probe", probe)
    deferred.settle()
    assert seen == [False]
