"""The fault suite's summary: faults survived, bad inputs refused, hostile inputs contained.

A test marked ``fault`` injects one fault and checks that the tool survived it (one clear
line, the right exit code, nothing bad published, every point restoring byte-identical);
a test marked ``bad_input`` feeds one kind of bad input and checks that it was refused; a
test marked ``hostile`` plants data the tool reads back (a manifest, a layer's header, an
agent request or answer, a volume's superblock) and checks that nothing outside what the
command names was touched.
Parametrized tests count once per parameter set. The counts are printed at the end of
every run that collected such tests (``make test`` and ``make faults``).

``make test`` runs the tests in two pytest runs (most of them in parallel workers, then the
``serial`` ones alone): with ``RDMB_SUITE_TALLY=FILE`` each run appends its counts to FILE
instead of printing them, and ``python -m tests.suite_report FILE`` prints the whole suite's
summary and one count line for both runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import pytest

TALLY_ENV = "RDMB_SUITE_TALLY"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")

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
_started: list[float] = []


def pytest_configure(config: pytest.Config) -> None:
    _started.append(time.monotonic())
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


def summary_lines(tallies: dict[str, _Tally] | None = None) -> list[str]:
    """One line per kind that ran, e.g. ``faults survived: 12/12``."""
    lines = []
    for kind, label in KINDS.items():
        tally = (tallies or _tallies)[kind]
        if tally.tried:
            lines.append(f"{label}: {len(tally.passed)}/{len(tally.tried)}")
            lines.extend(f"  not {label.split()[-1]}: {nodeid}" for nodeid in tally.failed)
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = summary_lines()
    path = os.environ.get(TALLY_ENV)
    if path and not hasattr(terminalreporter.config, "workerinput"):
        counts = {key: len(terminalreporter.stats.get(key, [])) for key in OUTCOMES}
        record = {"counts": counts, "seconds": time.monotonic() - _started[0],
                  "tallies": {kind: asdict(tally) for kind, tally in _tallies.items()}}
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        return
    if lines:
        terminalreporter.section("fault and bad-input suite")
        for line in lines:
            terminalreporter.write_line(line)


def combined(path: str) -> tuple[list[str], str]:
    """The summary lines and the count line of every run recorded in ``path``."""
    tallies = {kind: _Tally() for kind in KINDS}
    counts = dict.fromkeys(OUTCOMES, 0)
    seconds = 0.0
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            record = json.loads(line)
            seconds += record["seconds"]
            for key in OUTCOMES:
                counts[key] += record["counts"].get(key, 0)
            for kind, tally in record["tallies"].items():
                for name in ("tried", "passed", "failed"):
                    getattr(tallies[kind], name).extend(tally[name])
    words = {"error": "errors"}
    parts = [f"{counts[key]} {words.get(key, key)}" for key in OUTCOMES if counts[key]]
    count_line = f"{', '.join(parts) or 'no tests ran'} in {seconds:.2f}s (all runs)"
    return summary_lines(tallies), count_line


def main(argv: list[str]) -> int:
    """``python -m tests.suite_report FILE``: the whole suite's summary; 1 when a test failed."""
    if len(argv) != 1:
        print("usage: python -m tests.suite_report TALLY_FILE", file=sys.stderr)
        return 2
    lines, count_line = combined(argv[0])
    if lines:
        print(" fault and bad-input suite ".center(80, "="))
        print("\n".join(lines))
    print(count_line)
    return 1 if ("failed" in count_line or "error" in count_line) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
