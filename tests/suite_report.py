"""The fault suite's summary: faults survived, bad inputs refused, hostile inputs contained.

A test marked ``fault`` injects one fault and checks that the tool survived it (one clear
line, the right exit code, nothing bad published, every point restoring byte-identical);
a test marked ``bad_input`` feeds one kind of bad input and checks that it was refused; a
test marked ``hostile`` plants data the tool reads back (a manifest, a layer's header, an
agent request or answer, a volume's superblock) and checks that nothing outside what the
command names was touched.
Parametrized tests count once per parameter set. The counts are printed at the end of
every run that collected such tests (``make test`` and ``make faults``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

KINDS = {
    "fault": "faults survived",
    "bad_input": "bad inputs refused",
    "hostile": "hostile inputs contained",
}


@dataclass
class _Tally:
    tried: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


_tallies: dict[str, _Tally] = {kind: _Tally() for kind in KINDS}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fault: injects one fault; passing means the tool survived it")
    config.addinivalue_line(
        "markers", "bad_input: feeds one kind of bad input; passing means it was refused")
    config.addinivalue_line(
        "markers", "hostile: data read back from a repository, volume, agent or server is "
        "hostile; passing means nothing outside what the command names was touched")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    kinds = [kind for kind in KINDS if kind in report.keywords]
    if not kinds:
        return
    # a test counts once: at its call phase, or at setup when setup failed or skipped it
    if report.when == "call" or (report.when == "setup" and not report.passed):
        for kind in kinds:
            tally = _tallies[kind]
            if report.skipped:
                continue
            tally.tried.append(report.nodeid)
            (tally.passed if report.passed else tally.failed).append(report.nodeid)
    elif report.when == "teardown" and report.failed:
        # a failed cleanup is a failure too: move the test from passed to failed
        for kind in kinds:
            tally = _tallies[kind]
            if report.nodeid in tally.passed:
                tally.passed.remove(report.nodeid)
                tally.failed.append(report.nodeid)


def summary_lines() -> list[str]:
    """One line per kind that ran, e.g. ``faults survived: 12/12``."""
    lines = []
    for kind, label in KINDS.items():
        tally = _tallies[kind]
        if tally.tried:
            lines.append(f"{label}: {len(tally.passed)}/{len(tally.tried)}")
            lines.extend(f"  not {label.split()[-1]}: {nodeid}" for nodeid in tally.failed)
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = summary_lines()
    if lines:
        terminalreporter.section("fault and bad-input suite")
        for line in lines:
            terminalreporter.write_line(line)
